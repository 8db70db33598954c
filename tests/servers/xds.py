"""An xDS management server double: ADS, state of the world, on a loopback port, driven by the test.

It serves ``envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources`` from the generated
stubs in ``xds-protos``, with grpcio, and follows the "xDS REST and gRPC protocol" (Envoy's docs) as a real control
plane does:

* one stream carries every resource type; each type has its own subscription, nonce and version on the stream;
* a response carries ``version_info``, ``type_url``, a fresh ``nonce`` and the resources the stream subscribed to
  (``Any``-packed); for Listener and Cluster every subscribed resource that exists is in every response (absence
  means "deleted"), and such a response is sent even when none exists; for RouteConfiguration and
  ClusterLoadAssignment a response is sent only once something subscribed exists (or to tell a stream that was
  already sent resources of that type about a change);
* LDS/CDS wildcard: a stream whose first request for the type names nothing, or that names ``*``, gets every
  resource of the type; after naming resources (without ``*``) an empty list means "nothing";
* a request whose ``response_nonce`` is not the last nonce sent for its type on its stream is stale: recorded,
  otherwise ignored (the client will send the current state again with the newest nonce);
* a request that is not stale is answered whenever its subscription differs from what the last response on the
  stream covered (a new stream, a name added or dropped) -- not only the first request: gRPC's clients subscribe to
  RDS/CDS/EDS names one at a time as they learn them and wait for the answer;
* an ACK (``version_info`` = the response's, ``response_nonce`` = its nonce, no ``error_detail``) or a NACK
  (``error_detail`` set, ``version_info`` = the last version the client accepted) is recorded and never answered by
  re-sending the same resources;
* a change made by the test (:meth:`XdsServer.set`, :meth:`~XdsServer.remove`, :meth:`~XdsServer.set_raw`) gives
  the type a new version and is pushed to every stream subscribed to an affected name (wildcard streams always).

The test drives it from any thread; every request received is kept (:attr:`XdsServer.requests`) so a test can wait
for ACKs and NACKs (:meth:`~XdsServer.wait_for_ack`, :meth:`~XdsServer.wait_for_nack`) on a condition variable,
without sleeping. :meth:`~XdsServer.stop` ends every stream (``UNAVAILABLE``) and closes the port;
:meth:`~XdsServer.start` serves the same resources on the same port again (a control plane restart).
Delta xDS, CSDS and LRS are not served (``UNIMPLEMENTED``).
"""

from __future__ import annotations

import builtins
import itertools
import json
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

logger = logging.getLogger("tests.servers.xds")

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_CONFIGURATION = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
CLUSTER_LOAD_ASSIGNMENT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS, RDS, CDS, EDS = LISTENER, ROUTE_CONFIGURATION, CLUSTER, CLUSTER_LOAD_ASSIGNMENT
#: Types whose state-of-the-world responses are complete (absence = deletion) and which allow wildcard subscriptions.
FULL_STATE_TYPES = frozenset({LISTENER, CLUSTER})


@dataclass(frozen=True)
class Request:
    """One DiscoveryRequest as received, with the stream it came on (streams are numbered from 1 in arrival order)."""

    stream: int
    type_url: str
    version_info: str
    response_nonce: str
    resource_names: tuple[str, ...]
    error_code: int
    error_message: str
    node_id: str
    stale: bool

    @property
    def is_nack(self) -> bool:
        return bool(self.error_message) or self.error_code != 0


@dataclass(frozen=True)
class Response:
    """One DiscoveryResponse as sent."""

    stream: int
    type_url: str
    version_info: str
    nonce: str
    resource_names: tuple[str, ...]


@dataclass
class _Subscription:
    """One stream's state for one type: what it asked for and what it was last sent."""

    names: frozenset[str] = frozenset()
    wildcard: bool = False
    legacy_wildcard: bool = False
    seen_request: bool = False
    nonce: str = ""
    sent_any: bool = False
    sent_for: tuple[bool, frozenset[str]] | None = None  # (wildcard, names) the last response covered

    def covers(self, name: str) -> bool:
        return self.wildcard or name in self.names


_CLOSE = object()


@dataclass
class _Stream:
    number: int
    node_id: str = ""
    out: queue.Queue[Any] = field(default_factory=queue.Queue)
    subs: dict[str, _Subscription] = field(default_factory=dict)
    nonces: Iterator[int] = field(default_factory=lambda: itertools.count(1))


class XdsServer:
    """An ADS server on ``127.0.0.1``; :attr:`address` is the ``server_uri`` for a bootstrap file.

    Resources are kept per type as ``name -> Any``; :meth:`set` replaces a type's whole snapshot. Versions are
    per type: ``"1"``, ``"2"``... unless the caller names one.
    """

    def __init__(self, port: int = 0) -> None:
        self._port = port
        self._lock = threading.Condition()
        self._resources: dict[str, dict[str, any_pb2.Any]] = {}
        self._versions: dict[str, str] = {}
        self._counters: dict[str, Iterator[int]] = {}
        self._streams: dict[int, _Stream] = {}
        self._stream_numbers = itertools.count(1)
        self._requests: list[Request] = []
        self._responses: list[Response] = []
        self._server: grpc.Server | None = None
        self._stopping = False

    # -- lifecycle ----------------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._port}"

    def start(self) -> XdsServer:
        """Serve (again); the first start picks a free port, later ones bind the same port."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="xds-double"))
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(_Servicer(self), server)
        with self._lock:
            self._stopping = False
        port = server.add_insecure_port(f"127.0.0.1:{self._port}")
        if port == 0:
            raise RuntimeError(f"the xDS double could not bind 127.0.0.1:{self._port}")
        self._port = port
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        """End every stream (the client sees ``UNAVAILABLE``) and close the port; resources and records stay."""
        with self._lock:
            self._stopping = True
            for stream in self._streams.values():
                stream.out.put(_CLOSE)
        if self._server is not None:
            self._server.stop(grace=None).wait(10)
            self._server = None

    def __enter__(self) -> XdsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def bootstrap(self, node_id: str = "meshlib-test", **extra: Any) -> dict[str, Any]:
        """A gRPC xDS bootstrap (``GRPC_XDS_BOOTSTRAP_CONFIG``) pointing at this server, insecure, xDS v3."""
        config: dict[str, Any] = {
            "xds_servers": [
                {"server_uri": self.address, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}
            ],
            "node": {"id": node_id, "locality": {"zone": "test-zone"}},
        }
        config.update(extra)
        return config

    def bootstrap_json(self, node_id: str = "meshlib-test", **extra: Any) -> str:
        return json.dumps(self.bootstrap(node_id, **extra))

    # -- the test's side: resources -----------------------------------------------------------------------------

    def set(self, type_url: str, resources: Iterable[Message], version: str | None = None) -> str:
        """Replace every resource of ``type_url`` with ``resources`` (named by their ``name``/``cluster_name``);
        push to the streams subscribed to any name added, changed or dropped. Returns the new version."""
        packed: dict[str, any_pb2.Any] = {}
        for resource in resources:
            if type_url != "type.googleapis.com/" + resource.DESCRIPTOR.full_name:
                raise ValueError(f"a {resource.DESCRIPTOR.full_name} is not a {type_url} resource")
            any_msg = any_pb2.Any()
            any_msg.Pack(resource)
            packed[resource_name(resource)] = any_msg
        with self._lock:
            before = self._resources.get(type_url, {})
            self._resources[type_url] = packed
            return self._changed(type_url, set(before) | set(packed), version)

    def remove(self, type_url: str, name: str, version: str | None = None) -> str:
        """Take one resource away and push the type's new state to the streams subscribed to it."""
        with self._lock:
            if self._resources.get(type_url, {}).pop(name, None) is None:
                raise KeyError(f"no {type_url} resource named {name!r}")
            return self._changed(type_url, {name}, version)

    def set_raw(
        self, type_url: str, name: str, value: bytes, *, any_type_url: str | None = None, version: str | None = None
    ) -> str:
        """Add or replace the resource ``name`` with an ``Any`` holding ``value`` as it is (e.g. bytes that do not
        parse, or a serialized message that parses but is invalid); the other resources of the type stay."""
        with self._lock:
            self._resources.setdefault(type_url, {})[name] = any_pb2.Any(type_url=any_type_url or type_url, value=value)
            return self._changed(type_url, {name}, version)

    def version(self, type_url: str) -> str:
        """The type's current version (``""`` before anything was set)."""
        with self._lock:
            return self._versions.get(type_url, "")

    def names(self, type_url: str) -> list[str]:
        with self._lock:
            return sorted(self._resources.get(type_url, {}))

    def _changed(self, type_url: str, names: builtins.set[str], version: str | None) -> str:
        counter = self._counters.setdefault(type_url, itertools.count(1))
        new_version = version if version is not None else str(next(counter))
        self._versions[type_url] = new_version
        for stream in self._streams.values():
            sub = stream.subs.get(type_url)
            if sub is not None and sub.seen_request and any(sub.covers(name) for name in names):
                self._respond(stream, type_url, sub)
        self._lock.notify_all()
        return new_version

    # -- the test's side: observation ---------------------------------------------------------------------------

    @property
    def requests(self) -> list[Request]:
        """Every DiscoveryRequest received, in order (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def responses(self) -> list[Response]:
        """Every DiscoveryResponse sent, in order (a copy)."""
        with self._lock:
            return list(self._responses)

    def mark(self) -> int:
        """The number of requests received so far: pass it as ``after`` to wait only for later requests."""
        with self._lock:
            return len(self._requests)

    @property
    def open_streams(self) -> int:
        with self._lock:
            return len(self._streams)

    def subscribed(self, type_url: str) -> builtins.set[str]:
        """The names every open stream is subscribed to for ``type_url`` (``*`` for a wildcard subscription)."""
        with self._lock:
            names: builtins.set[str] = builtins.set()
            for stream in self._streams.values():
                sub = stream.subs.get(type_url)
                if sub is not None:
                    names |= sub.names | ({"*"} if sub.wildcard else set())
            return names

    def wait_for(self, predicate: Callable[[Request], bool], *, after: int = 0, timeout: float = 10.0) -> Request:
        """The first request (from index ``after`` on) matching ``predicate``, waiting for it; ``TimeoutError``."""

        def find() -> Request | None:
            return next((r for r in self._requests[after:] if predicate(r)), None)

        with self._lock:
            if not self._lock.wait_for(lambda: find() is not None, timeout):
                raise TimeoutError(f"no matching xDS request within {timeout} s; received: {self._requests[after:]}")
            found = find()
            assert found is not None
            return found

    def wait_for_ack(
        self, type_url: str, version: str | None = None, *, after: int = 0, timeout: float = 10.0
    ) -> Request:
        """Wait for an ACK of a response that carried ``version`` (default: the type's current version)."""
        with self._lock:
            wanted = version if version is not None else self._versions.get(type_url, "")
        return self.wait_for(
            lambda r: r.type_url == type_url and not r.is_nack and r.version_info == wanted and self._acks(r, wanted),
            after=after,
            timeout=timeout,
        )

    def wait_for_nack(self, type_url: str, version: str | None = None, *, after: int = 0, timeout: float = 10.0) -> str:
        """Wait for a NACK of a response that carried ``version`` (default: the type's current version); returns
        the client's ``error_detail.message``."""
        with self._lock:
            wanted = version if version is not None else self._versions.get(type_url, "")
        request = self.wait_for(
            lambda r: r.type_url == type_url and r.is_nack and self._acks(r, wanted), after=after, timeout=timeout
        )
        return request.error_message

    def _acks(self, request: Request, version: str) -> bool:
        """Whether ``request`` answers (by nonce) a response on its stream that carried ``version``."""
        return any(
            s.stream == request.stream and s.nonce == request.response_nonce and s.version_info == version
            for s in self._responses
        )

    # -- the protocol -------------------------------------------------------------------------------------------

    def _open(self) -> _Stream:
        with self._lock:
            stream = _Stream(number=next(self._stream_numbers))
            self._streams[stream.number] = stream
            self._lock.notify_all()
            return stream

    def _close(self, stream: _Stream) -> None:
        with self._lock:
            self._streams.pop(stream.number, None)
            self._lock.notify_all()

    def _receive(self, stream: _Stream, request: Any) -> None:
        """Handle one DiscoveryRequest (under the lock: nonces, subscriptions and pushes stay in one order)."""
        with self._lock:
            if request.HasField("node"):
                stream.node_id = request.node.id
            type_url = request.type_url
            sub = stream.subs.setdefault(type_url, _Subscription())
            stale = request.response_nonce != sub.nonce
            self._requests.append(
                Request(
                    stream=stream.number,
                    type_url=type_url,
                    version_info=request.version_info,
                    response_nonce=request.response_nonce,
                    resource_names=tuple(request.resource_names),
                    error_code=request.error_detail.code,
                    error_message=request.error_detail.message,
                    node_id=stream.node_id,
                    stale=stale,
                )
            )
            self._lock.notify_all()
            if stale:
                logger.debug("stream %d: stale nonce %r for %s", stream.number, request.response_nonce, type_url)
                return
            names = frozenset(request.resource_names)
            if type_url in FULL_STATE_TYPES:
                if not sub.seen_request:
                    sub.legacy_wildcard = not names
                elif names:
                    sub.legacy_wildcard = False
                sub.wildcard = sub.legacy_wildcard or "*" in names
                sub.names = names - {"*"}
            else:
                sub.names = names
            sub.seen_request = True
            if (sub.wildcard, sub.names) != sub.sent_for:
                self._respond(stream, type_url, sub)

    def _respond(self, stream: _Stream, type_url: str, sub: _Subscription) -> None:
        """Send ``type_url``'s current state for ``sub`` on ``stream`` (caller holds the lock)."""
        available = self._resources.get(type_url, {})
        chosen = sorted(name for name in available if sub.covers(name))
        if not chosen and type_url not in FULL_STATE_TYPES and not sub.sent_any:
            return  # nothing to say yet: an RDS/EDS response without the resource tells the client nothing
        nonce = f"{stream.number}-{next(stream.nonces)}"
        version = self._versions.get(type_url, "")
        response = discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=type_url, nonce=nonce, resources=[available[name] for name in chosen]
        )
        sub.nonce = nonce
        sub.sent_any = sub.sent_any or bool(chosen)
        sub.sent_for = (sub.wildcard, sub.names)
        self._responses.append(Response(stream.number, type_url, version, nonce, tuple(chosen)))
        stream.out.put(response)


def resource_name(resource: Message) -> str:
    """A resource's name: ``cluster_name`` for a ClusterLoadAssignment, ``name`` for the others."""
    for field_name in ("name", "cluster_name"):
        if field_name in resource.DESCRIPTOR.fields_by_name:
            return str(getattr(resource, field_name))
    raise ValueError(f"{resource.DESCRIPTOR.full_name} has no name field")


class _Servicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, server: XdsServer) -> None:
        self._server = server

    def StreamAggregatedResources(
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        server = self._server
        stream = server._open()
        context.add_callback(lambda: stream.out.put(_CLOSE))

        def read() -> None:
            try:
                for request in request_iterator:
                    server._receive(stream, request)
            except grpc.RpcError:
                pass  # the stream ended under us (client gone or server stopping)
            except Exception:
                logger.exception("xDS double: stream %d failed", stream.number)
            finally:
                stream.out.put(_CLOSE)

        reader = threading.Thread(target=read, name=f"xds-double-read-{stream.number}", daemon=True)
        reader.start()
        try:
            while True:
                item = stream.out.get()
                if item is _CLOSE:
                    break
                yield item
        finally:
            server._close(stream)
        if server._stopping and context.is_active():
            context.abort(grpc.StatusCode.UNAVAILABLE, "the xDS double is stopping")


def acked_types(requests: Sequence[Request]) -> set[str]:
    """The types with at least one ACK among ``requests`` (a request with a nonce and no error)."""
    return {r.type_url for r in requests if r.response_nonce and not r.is_nack and not r.stale}
