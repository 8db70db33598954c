"""An emulator of the subset of Consul's documented HTTP API that meshlib uses -- not Consul.

Consul has no server installable here, so discovery tests run against this: a real HTTP/1.1 server on
loopback (TCP, optionally TLS, or a unix socket), in its own threads, answering what Consul's documentation
says it answers. It follows:

* ``GET /v1/health/service/<name>`` (``api-docs/health.mdx``): ``dc`` (unknown -> 500 ``No path to
  datacenter``), ``tag`` (repeatable, all must match), ``passing`` (bare or a boolean; only instances whose
  checks *all* pass), ``near`` (accepted; instances keep registration order, there are no coordinates),
  ``filter`` (a small subset of bexpr: ``"<tag>" in Service.Tags`` and ``Service.Meta.<key> == "<value>"``
  joined with ``and``; anything else -> 400), ``stale`` / ``consistent`` (both -> 400), ``ns``,
  ``partition``, ``peer`` (accepted, ignored), ``token``. Entries have the documented shape (``Node``,
  ``Service`` with ``Weights`` defaulting to 1/1, ``Checks`` with the node's ``serfHealth``) plus the extra
  fields real answers carry (``CreateIndex``, ``ModifyIndex``, ``Proxy``, ``Connect``...).
* Blocking queries (``api-docs/features/blocking.mdx``): with ``index`` > 0 the request waits while the
  index is <= the one given, until a change or ``wait`` (default 5m, capped at 10m) plus up to ``wait/16``
  of jitter; every answer carries ``X-Consul-Index`` (a single raft-like index for everything, the worst
  case for "unrelated churn"), ``X-Consul-KnownLeader``, ``X-Consul-LastContact`` and
  ``X-Consul-Effective-Consistency``. A snapshot restore wakes blocked queries, as Consul abandons its
  state store then: they answer at once with the new, lower index.
* ACLs (``acl`` docs): ``X-Consul-Token`` header or ``?token=``; an unknown token -> 403 ``ACL not found``;
  a known token without ``service:read`` sees the instances filtered out, with
  ``X-Consul-Results-Filtered-By-ACLs: true`` (never for the anonymous token); a register without
  ``service:write`` -> 403 ``Permission denied: token with AccessorID '...' lacks permission ...``.
* Connect CA (``api-docs/agent/connect.mdx``): ``GET /v1/agent/connect/ca/roots`` (``ActiveRootID``,
  ``TrustDomain``, ``Roots`` with ``RootCert``, ``IntermediateCerts``, ``Active``...; no ACL needed) and
  ``GET /v1/agent/connect/ca/leaf/<service>`` (``CertPEM``, ``PrivateKeyPEM`` as SEC1 ``EC PRIVATE KEY``,
  ``ServiceURI``, ``ValidAfter``/``ValidBefore``...; ACL ``service:write`` on the service, else 403
  ``Permission denied``), both blocking queries as above. The CA is a test CA
  (:class:`tests.security.pki.CA`); a leaf is issued on first request (72 h, as Consul's default) with the
  one URI SAN Consul puts in it: ``spiffe://<trust domain>/ns/<ns>/dc/<dc>/svc/<service>`` (``/ap/<ap>``
  first for a non-default ``partition``).
* ``GET /v1/health/connect/<name>`` (``api-docs/health.mdx``): as the above, for the Connect-capable instances
  (here: those registered ``connect_native=True``, which carry ``Service.Connect.Native``).
* ``GET /v1/discovery-chain/<name>`` (``api-docs/discovery-chain.mdx``): ``{"Chain": ...}``, blocking, ACL
  ``service:read``, ``compile-dc``; the chain is what :meth:`ConsulEmulator.set_chain` gave (compiled by the test,
  or one of the documented examples in ``tests/fixtures/consul/``), else the default chain Consul compiles for a
  service without config entries (:meth:`ConsulEmulator.default_chain`). The emulator does not compile config
  entries.
* ``PUT /v1/agent/service/register``, ``/v1/agent/service/deregister/<id>``,
  ``/v1/agent/service/maintenance/<id>?enable=true&reason=...`` (maintenance adds the critical
  ``_service_maintenance:<id>`` check, as Consul does), ``GET /v1/status/leader``.

Test controls (methods, thread-safe): :meth:`ConsulEmulator.register`, ``deregister``, ``set_status``,
``set_node_health``, ``maintenance``, ``bump_index`` (unrelated churn), ``restore_snapshot`` (index goes
backwards), ``fail`` / ``recover`` (inject 429, 500, 503...), ``stop`` / ``start`` (same port),
``rotate_leaf`` / ``rotate_ca`` / ``drop_inactive_roots`` / ``leaf_for`` / ``spiffe_id`` (Connect CA), and what was
asked: ``requests``, ``count``, ``wait_for_requests``, ``wait_for_blocked`` -- synchronisation points, so
tests never sleep.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import os
import random
import re
import socket
import socketserver
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.security.pki import CA, Leaf
from tests.servers.consul_intentions import IntentionStore

__all__ = ["ACLToken", "ConsulEmulator", "RecordedQuery"]

STATUSES = ("passing", "warning", "critical")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_MAX_WAIT = 600.0
_DEFAULT_WAIT = 300.0
_FILTER_TAG = re.compile(r'^"([^"]*)"\s+in\s+Service\.Tags$')
_FILTER_META = re.compile(r'^Service\.Meta\.([A-Za-z0-9_-]+)\s*(==|!=)\s*(?:"([^"]*)"|([A-Za-z0-9_.-]+))$')


@dataclass(frozen=True)
class ACLToken:
    """An ACL token the emulator knows: ``read`` / ``write`` are the services it may read / register
    (``None``: all services)."""

    secret: str
    accessor: str = field(default_factory=lambda: str(uuid.uuid4()))
    read: frozenset[str] | None = None
    write: frozenset[str] | None = frozenset()

    def can_read(self, service: str) -> bool:
        return self.read is None or service in self.read

    def can_write(self, service: str) -> bool:
        return self.write is None or service in self.write


@dataclass(frozen=True)
class RecordedQuery:
    """One request the emulator received (the token as the test configured it, for assertions)."""

    method: str
    path: str
    params: Mapping[str, list[str]]
    token: str | None
    header_token: bool

    @property
    def index(self) -> int | None:
        """The ``index`` asked for (a blocking query), or ``None``."""
        values = self.params.get("index")
        return int(values[0]) if values and values[0].isdigit() else None

    @property
    def blocking(self) -> bool:
        return bool(self.index)


@dataclass
class _Node:
    name: str
    address: str
    datacenter: str
    meta: dict[str, str]
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    serf: str = "passing"
    maintenance: str | None = None  # reason, when in maintenance
    index: int = 0


@dataclass
class _Instance:
    id: str
    name: str
    node: str
    datacenter: str
    port: int
    address: str
    tags: tuple[str, ...]
    meta: dict[str, str]
    weights: tuple[int, int]
    checks: dict[str, str]  # CheckID -> status (service checks only)
    maintenance: str | None = None
    create_index: int = 0
    modify_index: int = 0
    #: A Connect Native service (``Connect.Native``): listed by ``/v1/health/connect/<name>``.
    connect_native: bool = False
    #: ``Service.Locality`` (Consul 1.17+): ``{"Region": ..., "Zone": ...}``, or ``None`` (left out, as older agents).
    locality: dict[str, str] | None = None


@dataclass
class _Root:
    ca: CA
    id: str
    active: bool
    index: int


@dataclass
class _IssuedLeaf:
    leaf: Leaf
    uri: str
    index: int


def _colon_hex(data: bytes) -> str:
    return ":".join(f"{byte:02x}" for byte in data)


def _go_time(value: datetime.datetime) -> str:
    return value.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Drop(Exception):
    """Close the connection without answering (the emulator is stopping: a crashed agent)."""


class _TCPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False


class ConsulEmulator:
    """A Consul agent (and its servers) as its HTTP API documents it; see the module docstring.

    ``datacenter`` is the agent's own; ``acl_tokens`` enables ACLs (``default_policy`` then applies to the
    anonymous token, i.e. requests without one); ``jitter=False`` makes blocking waits exactly ``wait``;
    ``ssl_context`` serves https; ``unix_socket`` listens on that path instead of TCP.
    """

    def __init__(
        self,
        *,
        datacenter: str = "dc1",
        datacenters: Iterable[str] = (),
        acl_tokens: Iterable[ACLToken] | None = None,
        default_policy: str = "deny",
        jitter: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        unix_socket: str | None = None,
        host: str = "127.0.0.1",
        first_index: int = 10,
        trust_domain: str = "11111111-2222-3333-4444-555555555555.consul",
    ) -> None:
        self.datacenter = datacenter
        self.datacenters = {datacenter, *datacenters}
        self.acl_enabled = acl_tokens is not None
        self.tokens = {t.secret: t for t in acl_tokens or ()}
        self.default_policy = default_policy
        self.jitter = jitter
        self.known_leader = True
        self.last_contact_ms = 0
        self._ssl = ssl_context
        self._unix = unix_socket
        self._host = host
        self._port = 0
        self._cond = threading.Condition()
        self.index = first_index
        self._nodes: dict[tuple[str, str], _Node] = {}
        self._instances: dict[tuple[str, str], _Instance] = {}  # (dc, id) -> instance, registration order
        self._abandoned = 0
        self._stopping = False
        self._blocked = 0
        self._failure: tuple[int, str] | None = None
        self._failures: deque[tuple[int, str]] = deque()
        self._held = False
        self._requests: list[RecordedQuery] = []
        self._health_count = 0
        self._server: socketserver.BaseServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._ids = itertools.count(1)
        self.trust_domain = trust_domain
        self._roots: list[_Root] = []
        self._leaves: dict[tuple[str, str, str | None], _IssuedLeaf] = {}
        self.intentions = IntentionStore(self)
        #: Answer as an agent that ignores ``filter=`` (an older or misbehaving one): every instance.
        self.ignore_filter = False
        #: Service -> its compiled discovery chain (:meth:`set_chain`); others get :meth:`default_chain`.
        self.chains: dict[str, dict[str, Any]] = {}

    # -- lifecycle

    def start(self) -> ConsulEmulator:
        """Listen (again, on the same port after :meth:`stop`) and serve from a daemon thread."""
        handler = _handler_for(self)
        server: socketserver.BaseServer
        if self._unix is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._unix)
            server = _UnixServer(self._unix, handler)
        else:
            server = _TCPServer((self._host, self._port), handler)
            self._port = server.server_address[1]
            if self._ssl is not None:
                server.socket = self._ssl.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        with self._cond:
            self._stopping = False
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="consul-emulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop as a crashed agent would: blocked queries end without an answer, the port refuses connections."""
        server, self._server = self._server, None
        if server is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        server.shutdown()
        server.server_close()
        for conn in list(self._connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> ConsulEmulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        """``127.0.0.1:port`` (what ``CONSUL_HTTP_ADDR`` takes), or ``unix:///path``."""
        if self._unix is not None:
            return f"unix://{self._unix}"
        return f"{self._host}:{self._port}"

    @property
    def url(self) -> str:
        scheme = "https" if self._ssl is not None else "http"
        return f"{scheme}://{self._host}:{self._port}"

    # -- catalog controls

    def register(
        self,
        name: str,
        port: int,
        *,
        id: str | None = None,
        address: str = "",
        tags: Iterable[str] = (),
        meta: Mapping[str, str] | None = None,
        weights: tuple[int, int] | None = None,
        node: str = "node1",
        node_address: str = "127.0.0.1",
        node_meta: Mapping[str, str] | None = None,
        datacenter: str | None = None,
        status: str | None = "passing",
        connect_native: bool = False,
        locality: Mapping[str, str] | None = None,
    ) -> str:
        """Register (or replace) a service instance; returns its ID. ``status`` is its one service check's
        status (``None``: no service check, as a registration without checks); ``connect_native``: a Connect
        Native instance (``/v1/health/connect/<name>`` lists it); ``locality``: its ``Service.Locality``
        (``{"Region": "us-east-1", "Zone": "us-east-1a"}``, Consul 1.17+)."""
        dc = datacenter or self.datacenter
        service_id = id or name
        with self._cond:
            self.datacenters.add(dc)
            index = self._next_index()
            node_key = (dc, node)
            if node_key not in self._nodes:
                self._nodes[node_key] = _Node(node, node_address, dc, dict(node_meta or {}), index=index)
            checks = {} if status is None else {f"service:{service_id}": _status(status)}
            previous = self._instances.get((dc, service_id))
            self._instances[(dc, service_id)] = _Instance(
                id=service_id,
                name=name,
                node=node,
                datacenter=dc,
                port=port,
                address=address,
                tags=tuple(tags),
                meta=dict(meta or {}),
                weights=weights or (1, 1),
                checks=checks,
                create_index=previous.create_index if previous else index,
                modify_index=index,
                connect_native=connect_native,
                locality=dict(locality) if locality is not None else None,
            )
            self._cond.notify_all()
        return service_id

    def deregister(self, service_id: str, *, datacenter: str | None = None) -> None:
        with self._cond:
            del self._instances[(datacenter or self.datacenter, service_id)]
            self._next_index()
            self._cond.notify_all()

    def set_status(self, service_id: str, status: str, *, datacenter: str | None = None) -> None:
        """Set the status of the instance's service check (``passing``, ``warning`` or ``critical``)."""
        with self._cond:
            instance = self._instances[(datacenter or self.datacenter, service_id)]
            instance.checks = {f"service:{service_id}": _status(status)}
            instance.modify_index = self._next_index()
            self._cond.notify_all()

    def set_node_health(self, node: str, status: str, *, datacenter: str | None = None) -> None:
        """Set a node's ``serfHealth`` check (``critical`` when the agent is gone)."""
        with self._cond:
            self._nodes[(datacenter or self.datacenter, node)].serf = _status(status)
            self._next_index()
            self._cond.notify_all()

    def maintenance(
        self, service_id: str, enable: bool = True, reason: str = "", *, datacenter: str | None = None
    ) -> None:
        """Service maintenance mode: Consul adds a critical ``_service_maintenance:<id>`` check."""
        with self._cond:
            instance = self._instances[(datacenter or self.datacenter, service_id)]
            instance.maintenance = (reason or "Maintenance mode is enabled for this service") if enable else None
            instance.modify_index = self._next_index()
            self._cond.notify_all()

    def bump_index(self, by: int = 1) -> None:
        """Unrelated churn: the index moves (another service, a KV write...) and blocked queries return."""
        with self._cond:
            self.index += by
            self._cond.notify_all()

    def restore_snapshot(self, index: int) -> None:
        """A raft snapshot restore: the index goes back to ``index`` and blocked queries answer at once."""
        with self._cond:
            if index >= self.index:
                raise ValueError(f"a restore makes the index go backwards: {index} >= {self.index}")
            self.index = index
            self._abandoned += 1
            self._cond.notify_all()

    def fail(self, status: int, body: str = "", *, times: int | None = None) -> None:
        """Answer health and Connect CA queries with ``status`` (429, 500 ``No cluster leader``, 503...): the
        next ``times`` ones, or every one until :meth:`recover` (blocked queries then fail too, as their RPC would)."""
        with self._cond:
            if times is None:
                self._failure = (status, body)
                self._abandoned += 1
            else:
                self._failures.extend([(status, body)] * times)
            self._cond.notify_all()

    def hold(self) -> None:
        """Accept health queries (recorded, so :meth:`wait_for_requests` sees them) and answer none until
        :meth:`release`: an agent that hangs (a stuck RPC to its servers)."""
        with self._cond:
            self._held = True

    def release(self) -> None:
        """Answer the held health queries (and every one after) as usual."""
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def recover(self) -> None:
        with self._cond:
            self._failure = None
            self._failures.clear()

    def set_chain(self, service: str, chain: Mapping[str, Any]) -> None:
        """Make ``chain`` (a compiled ``Chain`` object, as ``/v1/discovery-chain/<service>`` returns it: the test
        compiles config entries itself, or takes a documented example) the chain of ``service``."""
        with self._cond:
            self.chains[service] = json.loads(json.dumps(chain))
            self._next_index()
            self._cond.notify_all()

    def delete_chain(self, service: str) -> None:
        """Back to the default chain (no config entries: one resolver, the service itself)."""
        with self._cond:
            self.chains.pop(service, None)
            self._next_index()
            self._cond.notify_all()

    def default_chain(self, service: str, datacenter: str | None = None) -> dict[str, Any]:
        """The chain Consul compiles for a service with no router, splitter or resolver entries."""
        dc = datacenter or self.datacenter
        target = f"{service}.default.default.{dc}"
        return {
            "ServiceName": service,
            "Namespace": "default",
            "Partition": "default",
            "Datacenter": dc,
            "Protocol": "tcp",
            "Default": True,
            "StartNode": f"resolver:{target}",
            "Nodes": {
                f"resolver:{target}": {
                    "Type": "resolver",
                    "Name": target,
                    "Resolver": {"ConnectTimeout": "5s", "Default": True, "Target": target},
                }
            },
            "Targets": {
                target: {
                    "ID": target,
                    "Service": service,
                    "Namespace": "default",
                    "Partition": "default",
                    "Datacenter": dc,
                    "MeshGateway": {},
                    "Subset": {},
                    "ConnectTimeout": "5s",
                    "SNI": f"{service}.default.{dc}.internal.{self.trust_domain}",
                    "Name": f"{service}.default.{dc}.internal.{self.trust_domain}",
                }
            },
        }

    def _discovery_chain(
        self, name: str, params: Mapping[str, list[str]], secret: str | None
    ) -> tuple[int, dict[str, str], Any]:
        """Answer ``GET /v1/discovery-chain/<name>`` (blocking; ``compile-dc`` names the datacenter compiled for;
        ACL ``service:read`` on the service)."""
        dc = _one(params, "compile-dc") or self.datacenter

        def answer(token: ACLToken | None) -> tuple[int, Any]:
            if not self._can_read(token, name):
                return 403, "Permission denied"
            if dc not in self.datacenters:
                return 500, "No path to datacenter"
            chain = self.chains.get(name) or self.default_chain(name, dc)
            return 200, {"Chain": chain}

        return self._blocking(f"/v1/discovery-chain/{name}", params, secret, answer)  # type: ignore[no-any-return]

    def set_intentions(self, destination: str, sources: Iterable[Mapping[str, Any]]) -> None:
        """Write the ``service-intentions`` config entry of ``destination`` (its ``Sources``)."""
        self.intentions.set(destination, sources)

    def delete_intentions(self, destination: str) -> None:
        self.intentions.delete(destination)

    def _blocking(self, path: str, params: Mapping[str, list[str]], secret: str | None, answer: Any) -> Any:
        """Answer a blocking ``GET`` (intentions, config entries) with ``answer()`` -> (status, body): waits while
        ``index`` is current, as :meth:`_health` does; honours ACL errors, failures and :meth:`stop`."""
        with self._cond:
            self._cond.wait_for(lambda: not self._held or self._stopping)
            if self._failures:
                status, body = self._failures.popleft()
                return status, {}, body
            token, denied = self._token(secret)
            if denied:
                return 403, {}, denied
            invalid = self._block(params)  # the same index/wait rules (and jitter) as the health endpoint
            if invalid is not None:
                return invalid
            status, body = answer(token)
            return status, self._headers(stale=False, consistent=False), body

    def _intentions_match(self, params: Mapping[str, list[str]], secret: str | None) -> tuple[int, dict[str, str], Any]:
        if _one(params, "by") not in ("source", "destination"):
            return 400, {}, "required query parameter 'by' not set"
        names = params.get("name") or []
        if not names:
            return 400, {}, "required query parameter 'name' not set"

        def answer(token: ACLToken | None) -> tuple[int, Any]:
            if any(not self._can_read(token, name) for name in names):
                return 403, "Permission denied"
            return 200, {name: self.intentions.matches(name) for name in names}

        return self._blocking("/v1/connect/intentions/match", params, secret, answer)  # type: ignore[no-any-return]

    def _config_entry(
        self, kind: str, name: str, params: Mapping[str, list[str]], secret: str | None
    ) -> tuple[int, dict[str, str], Any]:
        def answer(token: ACLToken | None) -> tuple[int, Any]:
            if not self._can_read(token, name):
                return 403, "Permission denied"
            entry = self.intentions.entries.get(name) if kind == "service-intentions" else None
            if entry is None:
                return 404, f"Config entry not found for {kind!r} / {name!r}"
            return 200, entry

        return self._blocking(f"/v1/config/{kind}/{name}", params, secret, answer)  # type: ignore[no-any-return]

    def add_token(
        self, secret: str, *, read: Iterable[str] | None = None, write: Iterable[str] | None = ()
    ) -> ACLToken:
        """Create an ACL token (``read``/``write``: services it may read/register; ``None`` = all)."""
        token = ACLToken(
            secret,
            read=None if read is None else frozenset(read),
            write=None if write is None else frozenset(write),
        )
        with self._cond:
            self.acl_enabled = True
            self.tokens[secret] = token
        return token

    # -- Connect CA controls

    def spiffe_id(self, service: str, *, namespace: str = "default", partition: str | None = None) -> str:
        """The SPIFFE ID Consul gives ``service`` in this agent's datacenter (``/ap/`` for a non-default
        partition, as Consul's ``SpiffeIDService.URI``)."""
        path = f"/ns/{namespace}/dc/{self.datacenter}/svc/{service}"
        if partition and partition != "default":
            path = f"/ap/{partition}{path}"
        return f"spiffe://{self.trust_domain}{path}"

    def rotate_ca(self, *, keep_old: bool = True, trust_domain: str | None = None) -> CA:
        """A new active root (Consul's CA rotation); the old ones stay listed, inactive, unless ``keep_old`` is
        false. Leaves already issued are not re-signed (use :meth:`rotate_leaf`)."""
        with self._cond:
            self._active_root()  # the first root exists before it is rotated out
            ca = CA(f"Consul CA Root Cert {len(self._roots) + 1}")
            for root in self._roots:
                root.active = False
            if not keep_old:
                self._roots.clear()
            if trust_domain is not None:
                self.trust_domain = trust_domain
            self._roots.append(self._root(ca))
            self._cond.notify_all()
            return ca

    def drop_inactive_roots(self) -> None:
        """The end of a CA rotation: only the active root is listed."""
        with self._cond:
            self._roots = [root for root in self._roots if root.active]
            self._next_index()
            self._cond.notify_all()

    def rotate_leaf(
        self,
        service: str,
        *,
        namespace: str = "default",
        partition: str | None = None,
        uri: str | None = None,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> Leaf:
        """Issue ``service`` a new leaf from the active root (what the agent does before the old one expires);
        ``uri``/``not_before``/``not_after`` override the SPIFFE ID and the validity (hostile or broken
        leaves). Blocked leaf queries answer with it."""
        with self._cond:
            return self._issue(
                service, namespace=namespace, partition=partition, uri=uri, not_before=not_before, not_after=not_after
            ).leaf

    def leaf_for(self, service: str, *, namespace: str = "default", partition: str | None = None) -> Leaf:
        """The leaf ``service`` is given now (issued on first use)."""
        with self._cond:
            return self._leaf(service, namespace, partition).leaf

    @property
    def active_ca(self) -> CA:
        with self._cond:
            return self._active_root().ca

    def _root(self, ca: CA) -> _Root:
        ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        return _Root(ca, _colon_hex(ski), True, self._next_index())

    def _active_root(self) -> _Root:
        if not self._roots:
            self._roots.append(self._root(CA("Consul CA Root Cert 1")))
        return next(root for root in self._roots if root.active)

    def _leaf(self, service: str, namespace: str, partition: str | None) -> _IssuedLeaf:
        issued = self._leaves.get((service, namespace, partition))
        if issued is None:
            issued = self._issue(
                service, namespace=namespace, partition=partition, uri=None, not_before=None, not_after=None
            )
        return issued

    def _issue(
        self,
        service: str,
        *,
        namespace: str,
        partition: str | None,
        uri: str | None,
        not_before: datetime.datetime | None,
        not_after: datetime.datetime | None,
    ) -> _IssuedLeaf:
        now = datetime.datetime.now(datetime.timezone.utc)
        uri = uri or self.spiffe_id(service, namespace=namespace, partition=partition)
        leaf = self._active_root().ca.issue(
            uris=(uri,),
            common_name=service,
            not_before=not_before or now - datetime.timedelta(minutes=1),
            not_after=not_after or now + datetime.timedelta(hours=72),
        )
        issued = _IssuedLeaf(leaf, uri, self._next_index())
        self._leaves[(service, namespace, partition)] = issued
        self._cond.notify_all()
        return issued

    # -- observation

    @property
    def requests(self) -> list[RecordedQuery]:
        with self._cond:
            return list(self._requests)

    @property
    def count(self) -> int:
        """Health queries received so far."""
        with self._cond:
            return self._health_count

    @property
    def blocked(self) -> int:
        """Blocking queries waiting right now."""
        with self._cond:
            return self._blocked

    def health_queries(self) -> list[RecordedQuery]:
        return [r for r in self.requests if r.path.startswith(("/v1/health/service/", "/v1/health/connect/"))]

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> RecordedQuery:
        """Wait until ``count`` health queries have arrived; returns the ``count``-th."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._health_count >= count, timeout):
                raise AssertionError(f"expected {count} health queries within {timeout}s, got {self._health_count}")
            return [r for r in self._requests if r.path.startswith("/v1/health/service/")][count - 1]

    def wait_for_blocked(self, count: int = 1, timeout: float = 10.0) -> None:
        """Wait until ``count`` blocking queries are waiting (a client is parked on the current index)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._blocked >= count, timeout):
                raise AssertionError(f"expected {count} blocked queries within {timeout}s, got {self._blocked}")

    # -- request handling (called from handler threads)

    def _next_index(self) -> int:
        self.index += 1
        return self.index

    def _token(self, secret: str | None) -> tuple[ACLToken | None, str | None]:
        """(token, error body): the anonymous token is ``None``; an unknown secret is ``ACL not found``."""
        if not self.acl_enabled or not secret:
            return None, None
        token = self.tokens.get(secret)
        if token is None:
            return None, "ACL not found"
        return token, None

    def _can_read(self, token: ACLToken | None, service: str) -> bool:
        if not self.acl_enabled:
            return True
        if token is None:
            return self.default_policy == "allow"
        return token.can_read(service)

    def _record(self, method: str, path: str, params: Mapping[str, list[str]], header: str | None) -> None:
        token = header if header is not None else (params.get("token") or [None])[0]
        self._requests.append(RecordedQuery(method, path, params, token, header is not None))
        if path.startswith(("/v1/health/service/", "/v1/health/connect/")):
            self._health_count += 1
        self._cond.notify_all()

    def _headers(self, *, stale: bool, consistent: bool) -> dict[str, str]:
        headers = {
            "X-Consul-Index": str(self.index),
            "X-Consul-KnownLeader": "true" if self.known_leader else "false",
            "X-Consul-LastContact": str(self.last_contact_ms),
            "X-Consul-Effective-Consistency": "stale" if stale else ("consistent" if consistent else "leader"),
        }
        if self.acl_enabled:
            headers["X-Consul-Default-ACL-Policy"] = self.default_policy
        return headers

    def _health(
        self, name: str, params: Mapping[str, list[str]], secret: str | None, *, connect: bool = False
    ) -> tuple[int, dict[str, str], Any]:
        """Answer ``GET /v1/health/service/<name>`` (``/v1/health/connect/<name>`` with ``connect``: its Connect
        Native instances only): (status, headers, body: JSON value or text)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._held or self._stopping)
            if self._failures:
                status, body = self._failures.popleft()
                return status, {}, body
            token, denied = self._token(secret)
            if denied:
                return 403, {}, denied
            stale, consistent = "stale" in params, "consistent" in params
            if stale and consistent:
                return 400, {}, "Cannot specify ?stale with ?consistent, conflicting semantics."
            dc = _one(params, "dc") or self.datacenter
            if dc not in self.datacenters:
                return 500, {}, "No path to datacenter"
            passing = False
            if "passing" in params:
                raw = _one(params, "passing") or ""
                if raw == "" or raw.lower() in ("1", "t", "true"):
                    passing = True
                elif raw.lower() in ("0", "f", "false"):
                    passing = False
                else:
                    return 400, {}, "Invalid value for ?passing"
            try:
                predicates = [] if self.ignore_filter else _parse_filter(_one(params, "filter"))
            except ValueError as exc:
                return 400, {}, f"Failed to create boolean expression evaluator: {exc}"
            invalid = self._block(params)
            if invalid is not None:
                return invalid
            headers = self._headers(stale=stale, consistent=consistent)
            tags = params.get("tag", [])
            entries = []
            filtered = False
            for instance in self._instances.values():
                if instance.name != name or instance.datacenter != dc:
                    continue
                if connect and not instance.connect_native:
                    continue
                if any(tag not in instance.tags for tag in tags):
                    continue
                if not all(predicate(instance) for predicate in predicates):
                    continue
                node = self._nodes[(dc, instance.node)]
                checks = self._checks(instance, node)
                if passing and any(check["Status"] != "passing" for check in checks):
                    continue
                if not self._can_read(token, name):
                    filtered = True
                    continue
                entries.append(self._entry(instance, node, checks))
            if filtered and token is not None:  # never for the anonymous token (no information leak)
                headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
            return 200, headers, entries

    def _block(self, params: Mapping[str, list[str]]) -> tuple[int, dict[str, str], Any] | None:
        """A blocking query's wait (with ``self._cond`` held): ``None`` to answer now, else the error answer."""
        min_index = 0
        if "index" in params:
            raw_index = _one(params, "index") or ""
            if not raw_index.isdigit():
                return 400, {}, "Invalid index"
            min_index = int(raw_index)
        wait = _DEFAULT_WAIT
        if "wait" in params:
            parsed = _go_duration(_one(params, "wait") or "")
            if parsed is None:
                return 400, {}, "Invalid wait time"
            wait = min(parsed, _MAX_WAIT)
        if min_index > 0 and self._failure is None:
            if self.jitter:
                wait += random.uniform(0, wait / 16)
            deadline = time.monotonic() + wait
            generation = self._abandoned
            self._blocked += 1
            self._cond.notify_all()
            try:
                while self.index <= min_index and self._abandoned == generation and not self._stopping:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            finally:
                self._blocked -= 1
                self._cond.notify_all()
        if self._stopping:
            raise _Drop
        if self._failure is not None:
            return self._failure[0], {}, self._failure[1]
        return None

    def _connect_ca(
        self, what: str, service: str, params: Mapping[str, list[str]], secret: str | None
    ) -> tuple[int, dict[str, str], Any]:
        """Answer ``GET /v1/agent/connect/ca/roots`` (``what="roots"``) or ``.../leaf/<service>``."""
        with self._cond:
            self._cond.wait_for(lambda: not self._held or self._stopping)
            if self._failures:
                status, body = self._failures.popleft()
                return status, {}, body
            token, denied = self._token(secret)
            if denied:
                return 403, {}, denied
            namespace = _one(params, "ns") or "default"
            partition = _one(params, "partition")
            if (
                what == "leaf"
                and self.acl_enabled
                and not (token.can_write(service) if token else self.default_policy == "allow")
            ):
                who = f"token with AccessorID '{token.accessor}'" if token else "anonymous token"
                return 403, {}, f"Permission denied: {who} lacks permission 'service:write' on \"{service}\""
            self._active_root()  # the CA (and the leaf) exist before the index is reported
            if what == "leaf":
                self._leaf(service, namespace, partition)
            invalid = self._block(params)
            if invalid is not None:
                return invalid
            headers = self._headers(stale=False, consistent=False)
            if what == "roots":
                return 200, headers, self._roots_body()
            return 200, headers, self._leaf_body(service, self._leaf(service, namespace, partition))

    def _roots_body(self) -> dict[str, Any]:
        roots = []
        for root in self._roots:
            cert = root.ca.cert
            roots.append(
                {
                    "ID": root.id,
                    "Name": cert.subject.rfc4514_string(),
                    "SerialNumber": cert.serial_number & 0xFFFFFFFF,
                    "SigningKeyID": root.id,
                    "ExternalTrustDomain": self.trust_domain.split(".")[0],
                    "NotBefore": _go_time(cert.not_valid_before_utc),
                    "NotAfter": _go_time(cert.not_valid_after_utc),
                    "RootCert": root.ca.cert_pem.decode(),
                    "IntermediateCerts": None,
                    "Active": root.active,
                    "PrivateKeyType": "ec",
                    "PrivateKeyBits": 256,
                    "CreateIndex": root.index,
                    "ModifyIndex": root.index,
                }
            )
        return {"ActiveRootID": self._active_root().id, "TrustDomain": self.trust_domain, "Roots": roots}

    def _leaf_body(self, service: str, issued: _IssuedLeaf) -> dict[str, Any]:
        leaf = issued.leaf
        key = leaf.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
        return {
            "SerialNumber": _colon_hex(leaf.cert.serial_number.to_bytes(20, "big").lstrip(b"\0")),
            "CertPEM": leaf.cert_pem.decode(),
            "PrivateKeyPEM": key.decode(),
            "Service": service,
            "ServiceURI": issued.uri,
            "ValidAfter": _go_time(leaf.cert.not_valid_before_utc),
            "ValidBefore": _go_time(leaf.cert.not_valid_after_utc),
            "CreateIndex": issued.index,
            "ModifyIndex": issued.index,
        }

    def _checks(self, instance: _Instance, node: _Node) -> list[dict[str, Any]]:
        def check(check_id: str, name: str, status: str, service: bool, notes: str = "") -> dict[str, Any]:
            return {
                "Node": node.name,
                "CheckID": check_id,
                "Name": name,
                "Status": status,
                "Notes": notes,
                "Output": "",
                "ServiceID": instance.id if service else "",
                "ServiceName": instance.name if service else "",
                "ServiceTags": list(instance.tags) if service else [],
                "Type": "ttl" if service else "",
                "Interval": "",
                "Timeout": "",
                "ExposedPort": 0,
                "Definition": {},
                "CreateIndex": instance.create_index,
                "ModifyIndex": instance.modify_index,
            }

        checks = [check("serfHealth", "Serf Health Status", node.serf, False)]
        if node.maintenance is not None:
            checks.append(check("_node_maintenance", "Node Maintenance Mode", "critical", False, node.maintenance))
        for check_id, status in instance.checks.items():
            checks.append(check(check_id, f"Service '{instance.name}' check", status, True))
        if instance.maintenance is not None:
            checks.append(
                check(
                    f"_service_maintenance:{instance.id}",
                    "Service Maintenance Mode",
                    "critical",
                    True,
                    instance.maintenance,
                )
            )
        return checks

    def _entry(self, instance: _Instance, node: _Node, checks: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "Node": {
                "ID": node.id,
                "Node": node.name,
                "Address": node.address,
                "Datacenter": node.datacenter,
                "TaggedAddresses": {"lan": node.address, "lan_ipv4": node.address, "wan": node.address},
                "Meta": dict(node.meta) or {"consul-network-segment": ""},
                "CreateIndex": node.index,
                "ModifyIndex": node.index,
            },
            "Service": {
                "Kind": "",
                "ID": instance.id,
                "Service": instance.name,
                "Tags": list(instance.tags),
                "Address": instance.address,
                "Meta": dict(instance.meta),
                "Port": instance.port,
                "Weights": {"Passing": instance.weights[0], "Warning": instance.weights[1]},
                "EnableTagOverride": False,
                "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
                "Connect": {"Native": True} if instance.connect_native else {},
                "PeerName": "",
                **({"Locality": dict(instance.locality)} if instance.locality is not None else {}),
                "CreateIndex": instance.create_index,
                "ModifyIndex": instance.modify_index,
            },
            "Checks": checks,
        }

    def _register_from_api(self, body: Mapping[str, Any], secret: str | None) -> tuple[int, str]:
        name = str(body.get("Name") or "")
        if not name:
            return 400, "Missing service name"
        with self._cond:
            token, denied = self._token(secret)
            if denied:
                return 403, denied
            if self.acl_enabled and not (token.can_write(name) if token else self.default_policy == "allow"):
                who = f"token with AccessorID '{token.accessor}'" if token else "anonymous token"
                return 403, f"Permission denied: {who} lacks permission 'service:write' on \"{name}\""
        checks = [c for c in [body.get("Check"), *(body.get("Checks") or [])] if isinstance(c, dict)]
        # A new check starts critical unless the definition gives a status (Consul's agent).
        statuses = [str(c.get("Status") or "critical") for c in checks]
        worst = max(statuses, key=STATUSES.index) if statuses else None
        weights = body.get("Weights")
        self.register(
            name,
            int(body.get("Port") or 0),
            id=str(body.get("ID") or name),
            address=str(body.get("Address") or ""),
            tags=[str(t) for t in body.get("Tags") or []],
            meta={str(k): str(v) for k, v in (body.get("Meta") or {}).items()},
            weights=(int(weights.get("Passing", 1)), int(weights.get("Warning", 1))) if weights else None,
            node="emulator",
            status=worst,
        )
        return 200, ""


def _status(status: str) -> str:
    if status not in STATUSES:
        raise ValueError(f"a check status is one of {STATUSES}, got {status!r}")
    return status


def _one(params: Mapping[str, list[str]], key: str) -> str | None:
    values = params.get(key)
    return values[0] if values else None


def _go_duration(text: str) -> float | None:
    """Seconds from a Go duration (``5m``, ``300000ms``, ``1m30s``), or ``None``."""
    if not text:
        return None
    position, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != position:
            return None
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    return total if position == len(text) else None


def _parse_filter(expression: str | None) -> list[Any]:
    """The emulator's bexpr subset, as predicates over an instance; ``ValueError`` for anything else."""
    if not expression:
        return []
    predicates = []
    for part in re.split(r"\s+and\s+", expression.strip()):
        if match := _FILTER_TAG.match(part):
            tag = match.group(1)
            predicates.append(lambda instance, tag=tag: tag in instance.tags)
        elif match := _FILTER_META.match(part):
            key, op, quoted, bare = match.groups()
            value = quoted if quoted is not None else bare
            if op == "==":
                predicates.append(lambda instance, key=key, value=value: instance.meta.get(key) == value)
            else:  # go-bexpr: a missing key is "not equal"
                predicates.append(lambda instance, key=key, value=value: instance.meta.get(key) != value)
        else:
            raise ValueError(f"unsupported expression {part!r} (the emulator knows a small subset of bexpr)")
    return predicates


def _handler_for(emulator: ConsulEmulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "consul-emulator"

        def setup(self) -> None:
            super().setup()
            emulator._connections.add(self.connection)

        def finish(self) -> None:
            emulator._connections.discard(self.connection)
            with contextlib.suppress(OSError):
                super().finish()

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def address_string(self) -> str:
            return "unix" if isinstance(self.client_address, str) else str(self.client_address[0])

        def _answer(self, status: int, headers: Mapping[str, str], body: Any) -> None:
            if isinstance(body, (list, dict)):
                data = json.dumps(body).encode()
                content_type = "application/json"
            else:
                data = str(body).encode()
                content_type = "text/plain; charset=utf-8"
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for key, value in headers.items():
                self.send_header(key, value)
            try:
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the caller went away (a client closed mid-query)
                self.close_connection = True

        def _request(self) -> tuple[str, dict[str, list[str]], str | None]:
            url = urlsplit(self.path)
            params = parse_qs(url.query, keep_blank_values=True)
            header = self.headers.get("X-Consul-Token")
            with emulator._cond:
                emulator._record(self.command, url.path, params, header)
            secret = header if header is not None else _one(params, "token")
            return url.path, params, secret

        def do_GET(self) -> None:
            path, params, secret = self._request()
            try:
                if path.startswith(("/v1/health/service/", "/v1/health/connect/")):
                    connect = path.startswith("/v1/health/connect/")
                    name = unquote(path[len("/v1/health/service/") :])
                    if not name:
                        self._answer(400, {}, "Missing service name")
                        return
                    self._answer(*emulator._health(name, params, secret, connect=connect))
                elif path.startswith("/v1/discovery-chain/"):
                    name = unquote(path[len("/v1/discovery-chain/") :])
                    if not name:
                        self._answer(400, {}, "Missing service name")
                        return
                    self._answer(*emulator._discovery_chain(name, params, secret))
                elif path == "/v1/agent/connect/ca/roots":
                    self._answer(*emulator._connect_ca("roots", "", params, secret))
                elif path.startswith("/v1/agent/connect/ca/leaf/"):
                    service = unquote(path[len("/v1/agent/connect/ca/leaf/") :])
                    if not service:
                        self._answer(400, {}, "Missing service name")
                        return
                    self._answer(*emulator._connect_ca("leaf", service, params, secret))
                elif path == "/v1/connect/intentions/match":
                    self._answer(*emulator._intentions_match(params, secret))
                elif path.startswith("/v1/config/") and path.count("/") == 4:
                    _, _, _, kind, name = path.split("/")
                    self._answer(*emulator._config_entry(unquote(kind), unquote(name), params, secret))
                elif path == "/v1/status/leader":
                    self._answer(200, {}, json.dumps("127.0.0.1:8300"))
                else:
                    self._answer(404, {}, "404 page not found")
            except _Drop:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

        def do_PUT(self) -> None:
            path, params, secret = self._request()
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if path == "/v1/agent/service/register":
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    self._answer(400, {}, "Request decode failed")
                    return
                status, text = emulator._register_from_api(body, secret)
                self._answer(status, {}, text)
            elif path.startswith("/v1/agent/service/deregister/"):
                service_id = unquote(path.rsplit("/", 1)[1])
                try:
                    emulator.deregister(service_id, datacenter=None)
                except KeyError:
                    self._answer(404, {}, f'Unknown service ID "{service_id}". Ensure that the service ID is passed')
                    return
                self._answer(200, {}, "")
            elif path.startswith("/v1/agent/service/maintenance/"):
                service_id = unquote(path.rsplit("/", 1)[1])
                enable = (_one(params, "enable") or "").lower()
                if enable not in ("true", "false"):
                    self._answer(400, {}, "Missing value for enable")
                    return
                try:
                    emulator.maintenance(service_id, enable == "true", _one(params, "reason") or "")
                except KeyError:
                    self._answer(404, {}, f'Unknown service ID "{service_id}"')
                    return
                self._answer(200, {}, "")
            else:
                self._answer(404, {}, "404 page not found")

        def do_POST(self) -> None:
            path, _params, secret = self._request()
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if path != "/v1/agent/connect/authorize":
                self._answer(404, {}, "404 page not found")
                return
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                self._answer(400, {}, "Request decode failed")
                return
            with emulator._cond:
                status, answer = emulator.intentions.authorize(body, secret)
            self._answer(status, {}, answer)

    return Handler


@contextlib.contextmanager
def running(**kwargs: Any) -> Iterator[ConsulEmulator]:
    """``with running(...) as consul:`` -- a started emulator, stopped afterwards."""
    emulator = ConsulEmulator(**kwargs).start()
    try:
        yield emulator
    finally:
        emulator.stop()
