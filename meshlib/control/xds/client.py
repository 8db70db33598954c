"""The ADS client: one aggregated xDS stream (state of the world) to a management server, shared by every watcher.

What it does, after the xDS protocol (Envoy's "xDS REST and gRPC protocol") and gRPC's client (gRFCs A27, A40,
A46):

- **Subscriptions.** :meth:`AdsClient.watch` subscribes to ``(type_url, name)``; the stream sends one
  ``DiscoveryRequest`` per type with every subscribed name, again whenever the set changes (with the type's last
  accepted version and nonce, so the server knows what the client holds).
- **Responses.** Every resource of a response is decoded and validated by its :class:`ResourceType`. Valid ones are
  accepted even when others in the same response are not (gRFC A46); the response is then ACKed (``version_info`` =
  the response's) or, if any resource was invalid, NACKed (``version_info`` = the last accepted version,
  ``error_detail`` naming every invalid resource and field). An invalid resource keeps its last accepted value.
  For LDS and CDS a state-of-the-world response lists every subscribed resource: one that disappears is deleted
  (unless the server has the ``ignore_resource_deletion`` feature, as gRFC A53 says), for RDS and EDS absence
  means nothing.
- **Does not exist.** A name with no answer 15 s after it was requested on a live stream is reported as
  ``DOES_NOT_EXIST`` (gRPC's timer), so a watcher can stop waiting; a later answer still applies.
- **Fail-static.** When the stream breaks, every accepted resource stays as it is; the client reconnects with
  gRPC's connection backoff (1 s, x1.6, up to 120 s, 20 % jitter), resubscribes to everything, and re-validates
  what the server sends again. Watchers only hear about changes.
- **Never on the request path.** The stream runs on one daemon thread; watchers are called on it with immutable
  :class:`ResourceState` snapshots and must not block (they build their own snapshot and swap it in).
- **Introspection.** :meth:`AdsClient.resources` is every resource's state (version, ACKED/NACKED/REQUESTED/
  DOES_NOT_EXIST, error, update time): what CSDS (gRFC A40) reports; :meth:`AdsClient.connection` the stream's.
- **fork().** A child process never uses the parent's channel or thread; :meth:`AdsClient.resume` (called by users
  of the client when they need it) starts the child's own stream, with the resources the parent had accepted.

grpcio and Envoy's generated API (``xds-protos``) are the ``xds`` extra; they are imported when a client starts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from meshlib.control.xds.resources.errors import XdsResourceError

logger = logging.getLogger("meshlib.xds")

__all__ = [
    "LISTENER",
    "ROUTE_CONFIGURATION",
    "CLUSTER",
    "CLUSTER_LOAD_ASSIGNMENT",
    "AdsClient",
    "ConnectionState",
    "ResourceState",
    "ResourceType",
    "live_clients",
    "XdsResourceError",
]

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_CONFIGURATION = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
CLUSTER_LOAD_ASSIGNMENT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"

#: gRPC's resource-does-not-exist timer (seconds after the name was requested on a live stream).
DOES_NOT_EXIST_TIMEOUT = 15.0
#: gRPC's connection backoff (A6 / connection-backoff.md): initial, multiplier, jitter, maximum.
BACKOFF = (1.0, 1.6, 0.2, 120.0)
#: The longest error text sent in a NACK or kept in a state.
MAX_ERROR = 4096
#: The largest response accepted from the server (gRPC's default limit is 4 MiB; xDS snapshots can be larger).
MAX_MESSAGE = 64 * 1024 * 1024

Status = Literal["REQUESTED", "ACKED", "NACKED", "DOES_NOT_EXIST"]

#: Every live client of this process (weakly), for the admin endpoint's ``/config_dump``.
_LIVE: weakref.WeakSet[AdsClient] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


def live_clients() -> list[AdsClient]:
    """The ADS clients of this process that are alive and not closed, by server."""
    with _LIVE_LOCK:
        clients = list(_LIVE)
    return sorted((c for c in clients if not c._stop.is_set()), key=lambda c: c.server)


class ResourceType(Protocol):
    """How one xDS type is decoded and validated (the ``resources`` package implements one per type)."""

    #: The type URL (``type.googleapis.com/envoy.config.listener.v3.Listener``).
    type_url: str
    #: Whether a response lists every subscribed resource (LDS, CDS): then absence means deletion.
    all_in_response: bool

    def decode(self, resource: Any) -> tuple[str, object]:
        """The resource's name and validated value from the ``google.protobuf.Any`` (or a ``Resource`` wrapper).

        Raises :class:`XdsResourceError` for an invalid resource, with the name when it could be read
        (``error.name``) so that resource, not the whole type, is marked NACKED."""
        ...


@dataclass(frozen=True, slots=True)
class ResourceState:
    """One resource as the client holds it: the last accepted ``value`` (``None`` before one, or deleted), its
    ``version``, ``status`` of the newest answer about it, ``error`` of the last NACK naming it, and when it last
    changed (wall clock)."""

    type_url: str
    name: str
    value: object | None = None
    version: str = ""
    status: Status = "REQUESTED"
    error: str | None = None
    updated_at: float | None = None
    #: The accepted resource as the server sent it (a ``google.protobuf.Any``), for the config dump (CSDS).
    raw: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class ConnectionState:
    """The stream: which server, whether it is up, how many times it was (re)established, the last error."""

    server: str
    connected: bool
    streams: int
    last_error: str | None
    since: float | None


Watcher = Callable[[ResourceState], None]
#: Called with every resource a wildcard subscription holds (name -> state), after each answer of the type.
WildcardWatcher = Callable[[dict[str, "ResourceState"]], None]
ChannelFactory = Callable[[], Any]


@dataclass(slots=True)
class _Type:
    """Per type: subscribed names with their watchers, states, and the type's last accepted version and nonce."""

    decoder: ResourceType
    watchers: dict[str, list[Watcher]] = field(default_factory=dict)
    #: Watchers of every resource of the type (a wildcard subscription), called with the whole set.
    wildcard: list[WildcardWatcher] = field(default_factory=list)
    #: The names a wildcard answer last brought (their states are in ``states``).
    wildcard_names: set[str] = field(default_factory=set)
    states: dict[str, ResourceState] = field(default_factory=dict)
    version: str = ""
    nonce: str = ""
    requested_at: dict[str, float] = field(default_factory=dict)


class AdsClient:
    """One ADS stream to ``server`` (a printable URI) over the channel ``channel_factory`` makes, identifying itself
    with ``node`` (an ``envoy.config.core.v3.Node``); ``types`` decode and validate each resource type.

    ``ignore_resource_deletion``: the bootstrap's server feature (gRFC A53): an LDS/CDS resource missing from a
    response is kept. ``does_not_exist_timeout`` and ``backoff`` as gRPC's (tests shorten them).
    """

    def __init__(
        self,
        server: str,
        channel_factory: ChannelFactory,
        node: Any,
        types: Mapping[str, ResourceType],
        *,
        ignore_resource_deletion: bool = False,
        does_not_exist_timeout: float = DOES_NOT_EXIST_TIMEOUT,
        backoff: tuple[float, float, float, float] = BACKOFF,
    ) -> None:
        self.server = server
        self._channel_factory = channel_factory
        self._node = node
        self._ignore_deletion = ignore_resource_deletion
        self._dne_timeout = does_not_exist_timeout
        self._backoff = backoff
        self._lock = threading.RLock()
        self._types = {url: _Type(decoder) for url, decoder in types.items()}
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._connected = False
        self._streams = 0
        self._last_error: str | None = None
        self._since: float | None = None
        self._thread: threading.Thread | None = None
        self._call: Any = None
        self._pid = os.getpid()
        self._first_message = True
        with _LIVE_LOCK:
            _LIVE.add(self)

    # -- the API ----------------------------------------------------------------------------------------------

    def watch(self, type_url: str, name: str, watcher: Watcher) -> Callable[[], None]:
        """Call ``watcher`` with the state of ``(type_url, name)`` now (if known) and on every change; returns the
        function that cancels the watch (the name is unsubscribed when its last watcher goes)."""
        with self._lock:
            entry = self._types[type_url]
            watchers = entry.watchers.setdefault(name, [])
            watchers.append(watcher)
            new = len(watchers) == 1
            state = entry.states.get(name)
            if new:
                entry.requested_at[name] = time.monotonic()
                self._send_subscription(type_url)
        if state is not None and state.status != "REQUESTED":
            watcher(state)
        self.start()

        def cancel() -> None:
            with self._lock:
                current = entry.watchers.get(name)
                if current is None or watcher not in current:
                    return
                current.remove(watcher)
                if not current:
                    del entry.watchers[name]
                    entry.requested_at.pop(name, None)
                    entry.states.pop(name, None)  # as gRPC's cache: a resource nobody watches is forgotten
                    self._send_subscription(type_url)

        return cancel

    def watch_all(self, type_url: str, watcher: WildcardWatcher) -> Callable[[], None]:
        """Subscribe to every resource of ``type_url`` (an xDS wildcard: LDS and CDS only) and call ``watcher``
        with all of them (name -> state) after each answer of that type; returns the function that cancels.

        The request says wildcard the way every server understands: an empty name list while nothing is named,
        else ``"*"`` beside the names (the xDS protocol's explicit wildcard)."""
        with self._lock:
            entry = self._types[type_url]
            if not entry.decoder.all_in_response:
                raise ValueError(f"a wildcard subscription is for LDS and CDS only, not {type_url}")
            entry.wildcard.append(watcher)
            if len(entry.wildcard) == 1:
                self._send_subscription(type_url)
        self.start()

        def cancel() -> None:
            with self._lock:
                if watcher in entry.wildcard:
                    entry.wildcard.remove(watcher)
                    if not entry.wildcard:
                        for name in entry.wildcard_names:
                            if name not in entry.watchers:
                                entry.states.pop(name, None)
                        entry.wildcard_names.clear()
                        self._send_subscription(type_url)

        return cancel

    @property
    def node(self) -> Any:
        """The ``envoy.config.core.v3.Node`` this client identifies itself with."""
        return self._node

    def resources(self) -> list[ResourceState]:
        """Every resource's state, by type and name (CSDS)."""
        with self._lock:
            return [state for entry in self._types.values() for _, state in sorted(entry.states.items())]

    def connection(self) -> ConnectionState:
        """The stream's state."""
        with self._lock:
            return ConnectionState(self.server, self._connected, self._streams, self._last_error, self._since)

    def start(self) -> None:
        """Start the stream's thread (idempotent; :meth:`watch` calls it)."""
        with self._lock:
            self.resume()
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name=f"meshlib-xds {self.server}", daemon=True)
                self._thread.start()

    def resume(self) -> None:
        """In a forked child: forget the parent's thread and stream (never touching them) and start this process's
        own; accepted resources are kept. A pid check otherwise."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self._outbox = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread = None
        self._call = None
        self._connected = False

    def close(self) -> None:
        """End the stream and its thread; watchers hear nothing more."""
        self._stop.set()
        self._wake.set()
        call = self._call
        if call is not None:
            call.cancel()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    # -- the stream -------------------------------------------------------------------------------------------

    def _request(self, type_url: str, *, error: str | None = None) -> Any:
        from envoy.service.discovery.v3 import discovery_pb2
        from google.rpc import status_pb2  # type: ignore[import-untyped]

        entry = self._types[type_url]
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            version_info=entry.version,
            response_nonce=entry.nonce,
            resource_names=(["*", *sorted(entry.watchers)] if entry.watchers else [])
            if entry.wildcard
            else sorted(entry.watchers),
        )
        if self._first_message:  # the node goes in the stream's first request only (the protocol allows it)
            request.node.CopyFrom(self._node)
            self._first_message = False
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error[:MAX_ERROR]))  # INVALID_ARGUMENT
        return request

    def _send_subscription(self, type_url: str) -> None:
        if self._connected:
            self._outbox.put(self._request(type_url))

    def _requests(self, initial: list[Any], outbox: queue.SimpleQueue[Any]) -> Iterator[Any]:
        """The stream's requests: the initial subscriptions, then whatever is put in this stream's ``outbox``
        (``None`` ends it). Bound to one stream's queue: a later stream has its own."""
        yield from initial
        while not self._stop.is_set():
            item = outbox.get()
            if item is None:
                return
            yield item

    def _run(self) -> None:
        delay = self._backoff[0]
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._stream_once()
            except Exception as exc:  # a broken stream: keep every accepted resource, reconnect
                with self._lock:
                    self._connected = False
                    self._last_error = _short(exc)
                if not self._stop.is_set():
                    logger.warning("xDS stream to %s broke (%s); reconnecting", self.server, self._last_error)
            if self._stop.is_set():
                return
            if time.monotonic() - started > 10 * self._backoff[0]:
                delay = self._backoff[0]  # the stream had worked for a while: start the backoff over
            _, multiplier, jitter, maximum = self._backoff
            wait = delay * (1 + random.uniform(-jitter, jitter))
            self._wake.wait(wait)
            delay = min(delay * multiplier, maximum)

    def _stream_once(self) -> None:
        from envoy.service.discovery.v3 import ads_pb2_grpc

        channel = self._channel_factory()
        try:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            with self._lock:
                outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
                self._outbox = outbox
                self._first_message = True
                for entry in self._types.values():
                    entry.nonce = ""  # nonces belong to a stream
                    now = time.monotonic()
                    for name in entry.watchers:
                        entry.requested_at[name] = now
                initial = [self._request(url) for url, entry in self._types.items() if entry.watchers or entry.wildcard]
                self._connected = True
                self._streams += 1
                self._since = time.time()
            call = stub.StreamAggregatedResources(self._requests(initial, outbox))
            self._call = call
            timer = threading.Thread(target=self._dne_timer, daemon=True, name="meshlib-xds timer")
            timer.start()
            for response in call:
                self._on_response(response)
        finally:
            with self._lock:
                self._connected = False
            outbox.put(None)
            channel.close()

    def _dne_timer(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if not self._connected:
                    return
                now = time.monotonic()
                due: list[ResourceState] = []
                for url, entry in self._types.items():
                    for name, since in list(entry.requested_at.items()):
                        state = entry.states.get(name)
                        if (state is None or state.status == "REQUESTED") and now - since >= self._dne_timeout:
                            new = ResourceState(url, name, None, "", "DOES_NOT_EXIST", None, time.time())
                            entry.states[name] = new
                            del entry.requested_at[name]
                            due.append(new)
            for state in due:
                self._notify(state)
            self._stop.wait(min(1.0, self._dne_timeout / 4))

    def _on_response(self, response: Any) -> None:
        type_url = response.type_url
        with self._lock:
            entry = self._types.get(type_url)
            if entry is None:  # a type nobody asked for: NACK it so the server knows
                logger.warning("xDS server %s sent unrequested type %.200s", self.server, type_url)
                return
            errors: list[str] = []
            seen: set[str] = set()
            changed: list[ResourceState] = []
            now = time.time()
            for index, resource in enumerate(response.resources):
                try:
                    name, value = entry.decoder.decode(resource)
                except XdsResourceError as exc:
                    name = exc.name or f"resources[{index}]"
                    errors.append(f"{type_url.rsplit('.', 1)[-1]} {name}: {exc}")
                    if name in entry.watchers or entry.wildcard:
                        seen.add(name)
                        old = entry.states.get(name) or ResourceState(type_url, name)
                        nacked = ResourceState(
                            type_url, name, old.value, old.version, "NACKED", str(exc)[:MAX_ERROR], now, old.raw
                        )
                        entry.states[name] = nacked
                        changed.append(nacked)
                    continue
                seen.add(name)
                if name not in entry.watchers and not entry.wildcard:
                    continue  # not subscribed (a wildcard answer to another watcher): not kept
                entry.requested_at.pop(name, None)
                previous = entry.states.get(name)
                if previous is not None and previous.status == "ACKED" and previous.value == value:
                    # Unchanged: watchers hear nothing, but the version is the response's (as CSDS reports it).
                    entry.states[name] = dataclasses.replace(previous, version=response.version_info, raw=resource)
                    continue
                accepted = ResourceState(type_url, name, value, response.version_info, "ACKED", None, now, resource)
                entry.states[name] = accepted
                changed.append(accepted)
            if entry.decoder.all_in_response and not self._ignore_deletion:
                for name in list(entry.watchers) + sorted(entry.wildcard_names - entry.watchers.keys()):
                    state = entry.states.get(name)
                    if name not in seen and state is not None and state.value is not None:
                        gone = ResourceState(type_url, name, None, response.version_info, "DOES_NOT_EXIST", None, now)
                        entry.states[name] = gone
                        changed.append(gone)
            wildcard: list[WildcardWatcher] = []
            everything: dict[str, ResourceState] = {}
            if entry.wildcard:
                kept = seen if not self._ignore_deletion else seen | entry.wildcard_names
                for name in entry.wildcard_names - kept:
                    if name not in entry.watchers:
                        entry.states.pop(name, None)
                entry.wildcard_names = {name for name in kept if name in entry.states}
                everything = {name: entry.states[name] for name in sorted(entry.wildcard_names)}
                wildcard = list(entry.wildcard)
            entry.nonce = response.nonce
            if errors:
                self._outbox.put(self._request(type_url, error="; ".join(errors)))
                logger.error(
                    "xDS %s version %.100s NACKed: %s", type_url, response.version_info, "; ".join(errors)[:1000]
                )
            else:
                entry.version = response.version_info
                self._outbox.put(self._request(type_url))
        for state in changed:
            self._notify(state)
        for watch_all in wildcard:
            try:
                watch_all(everything)
            except Exception:  # one watcher's bug must not stop the stream
                logger.exception("xDS wildcard watcher for %s failed", type_url)

    def _notify(self, state: ResourceState) -> None:
        with self._lock:
            watchers = list(self._types[state.type_url].watchers.get(state.name, ()))
        for watcher in watchers:
            try:
                watcher(state)
            except Exception:  # one watcher's bug must not stop the stream
                logger.exception("xDS watcher for %s %s failed", state.type_url, state.name)


def _short(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):
        try:
            return f"{code()}: {details()}"[:300]
        except Exception:
            pass
    return f"{type(exc).__name__}: {exc}"[:300]
