"""Consul's discovery chain steering a client: ``consul+chain://payments`` routed as Consul's own proxies route it.

A service whose target is ``consul+chain://<name>`` (``MESHLIB_SERVICE_PAYMENTS=consul+chain://payments``) is
reached through the routes of its compiled discovery chain. One :class:`ConsulChainSource` per client does the
work, on daemon threads of its own (never on the request path):

* for each such service, a blocking query on ``GET /v1/discovery-chain/<name>`` (``compile-dc``, ``ns``,
  ``partition`` from the target's query, else the agent's ``CONSUL_NAMESPACE``/``CONSUL_PARTITION``); each answer
  is validated and mapped (:mod:`meshlib.control.consul.chain`) onto a route table for the called host and one
  meshlib service per resolver node (``consul-chain:<node>``), installed in one swap
  (``_Mesh.apply_control_plane``). A chain change therefore moves traffic within one blocking-query round trip;
* each target of those services is watched with its own blocking query on ``/v1/health/connect/<service>``
  (Connect Native instances and sidecar proxies) when the client has a Consul identity
  (``MESHLIB_CONSUL_SERVICE``), else on ``/v1/health/service/<service>``; with the target's ``dc``, ``ns``,
  ``partition``, ``peer`` and its subset's ``filter`` (sent to the agent, and evaluated here as well, so an agent
  that ignores it cannot widen the set). A resolver node's endpoints are its targets' instances, each target at
  the priority of its place in the failover order: the balancer fails over to the next target when one has no
  usable instance, and back when it has again. Targets shared by several services are watched once;
* with a Consul identity, a target's endpoints are called over mTLS presenting this service's leaf, and the
  upstream must present the target's Consul SPIFFE ID (``spiffe://<td>/ns/<ns>/dc/<dc>/svc/<service>``); each
  endpoint is checked against the identity of the target it came from; ``http://`` URLs are upgraded;
* a chain that cannot be honoured (:class:`~meshlib.control.consul.chain.ChainError`) is refused whole: the
  previous chain keeps serving (logged at ERROR, shown in :meth:`ConsulChainSource.status`); before any usable
  chain, calls fail at once with the reason. An agent that does not answer keeps the last chain and endpoints
  (fail static), retried with the blocking-query backoff; before the first answer, calls wait for it (bounded by
  their deadline), and an ACL refusal fails them at once, naming where the token came from.

Routes from ``MESHLIB_ROUTES_FILE`` combine with the chains as with xDS: the chain routes its own hosts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl, quote

from meshlib._config.model import ServiceConfig
from meshlib.control.dynamic import DEFAULT_WAIT, Placeholder, PushedResolver, merge_tables, take_batch
from meshlib.discovery import Target, scheme_of
from meshlib.discovery.base import DiscoverySettings, Endpoint, Resolution
from meshlib.errors import ConsulACLError, DiscoveryError
from meshlib.status import ConsulChainStatus

if TYPE_CHECKING:
    from meshlib._config.model import MeshConfig
    from meshlib.control.consul.chain import ChainMapping, ChainTarget
    from meshlib.discovery.consul.agent import AgentClient, ConsulAgent, Reply
    from meshlib.discovery.consul.query import BlockingQuery, WatchOptions
    from meshlib.routing.model import RouteTable
    from meshlib.security.consul_ca import ConsulCASource

__all__ = ["FORM", "ChainPlaceholder", "ConsulChainSource", "from_target"]

logger = logging.getLogger("meshlib.control.consul")

FORM: Final = "consul+chain://service[?dc=dc1&ns=namespace&partition=partition]"
CHAIN_PATH: Final = "/v1/discovery-chain/"
#: How long a chain service the routes stop naming (a split leg set to 0, a canary rolled back) keeps its service
#: and its targets' watches (seconds), and how many may linger at once: flipping back then moves traffic with the
#: route table alone, no new watch and no first query (as xDS clusters linger).
CHAIN_LINGER: Final = 60.0
MAX_LINGERING: Final = 64
#: The blocking-query pacing of every chain and target watch (``None``: Consul's guidance, see
#: :class:`~meshlib.discovery.consul.query.WatchOptions`); read when a client is built (tests shorten it).
WATCH_OPTIONS: WatchOptions | None = None
_PARAMS: Final = ("dc", "ns", "partition")


# -- the placeholder of a consul+chain:// service --------------------------------------------------------------------


class ChainPlaceholder(Placeholder):
    """The resolver of ``consul+chain://<name>``: a placeholder (calls are routed by the chain, see
    :class:`~meshlib.control.dynamic.Placeholder`); ``chain`` is the Consul service whose chain is asked for and
    ``params`` the query's ``compile-dc``/``ns``/``partition``."""

    def __init__(self, service: str, target: str, chain: str, params: tuple[tuple[str, str], ...]) -> None:
        super().__init__(service, target, f"Consul discovery chain {target}", "no discovery chain from Consul yet")
        self.chain = chain
        self.params = params


def from_target(target: Target, settings: DiscoverySettings) -> ChainPlaceholder:
    """The ``consul+chain`` scheme's factory: check the target's form (the agent is checked by the client)."""
    del settings
    rest = target.rest
    if "#" in rest:
        raise target.invalid("no '#fragment' in a consul+chain:// target")
    name, _, query = rest.partition("?")
    if not name or "/" in name or "@" in name or any(c.isspace() or ord(c) < 32 for c in name):
        raise target.invalid("a Consul service name after consul+chain:// (the agent is set with CONSUL_HTTP_ADDR)")
    params: list[tuple[str, str]] = []
    seen: set[str] = set()
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in _PARAMS:
            raise target.invalid(f"query parameters among {', '.join(_PARAMS)} (unknown: {key})")
        if key in seen or not value.strip():
            raise target.invalid(f"{key}= given once, with a value")
        seen.add(key)
        params.append(("compile-dc" if key == "dc" else key, value.strip()))
    return ChainPlaceholder(target.service, target.uri, name, tuple(params))


# -- status ------------------------------------------------------------------------------------------------------------


# -- blocking-query loops ----------------------------------------------------------------------------------------------


class _Loop:
    """One blocking-query loop on a daemon thread: pause (rate limit or backoff), query, hand the reply over."""

    def __init__(self, name: str, query: BlockingQuery, agent: ConsulAgent) -> None:
        from meshlib.discovery.consul.agent import AgentClient

        self.name = name
        self.query = query
        self.closed = threading.Event()
        self.client: AgentClient = AgentClient(agent, self.closed)
        self.thread: threading.Thread | None = None

    def start(self, body: Callable[[_Loop], None]) -> None:
        self.thread = threading.Thread(target=body, args=(self,), name=f"meshlib-consul-{self.name}", daemon=True)
        self.thread.start()

    def next_reply(self) -> Reply | None:
        """Pause as the blocking-query rules say (rate limit, backoff), then send the next query; ``None`` once
        the loop is stopped (a query in flight ends at once)."""
        from meshlib.discovery.consul.agent import _Closed

        delay = self.query.pause()
        if delay > 0 and self.closed.wait(delay):
            return None
        try:
            return self.client.send(self.query.next_request())
        except _Closed:
            return None

    def stop(self) -> None:
        """End the loop (a query in flight ends at once); from any thread."""
        self.client.close()  # sets ``closed`` first, then shuts the socket of a query in flight

    def join(self, deadline: float) -> None:
        """Wait (until ``time.monotonic()`` reaches ``deadline``) for the stopped loop's thread to end."""
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


class _TargetWatch:
    """The instances of one chain target, watched; shared by every service that names the target."""

    def __init__(self, key: tuple[str, bool], target: ChainTarget, loop: _Loop) -> None:
        self.key = key
        self.target = target
        self.loop = loop
        self._lock = threading.Lock()
        self._subscribers: list[Callable[[], None]] = []
        self.answer: Resolution | None = None
        self.error: DiscoveryError | None = None
        #: Set once the first query ended (answered or failed): a service's first answer waits for all its targets.
        self.settled = False

    def subscribe(self, wake: Callable[[], None]) -> None:
        with self._lock:
            self._subscribers.append(wake)

    def unsubscribe(self, wake: Callable[[], None]) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._subscribers.remove(wake)

    def deliver(self, answer: Resolution | None, error: DiscoveryError | None) -> None:
        with self._lock:
            changed = not self.settled or (answer is not None and answer is not self.answer)
            if answer is not None:
                self.answer, self.error = answer, None
            else:
                self.error = error
            self.settled = True
            subscribers = list(self._subscribers) if changed else []
        for wake in subscribers:
            wake()


class ChainEndpoints(PushedResolver):
    """The endpoints of one resolver node: each target's instances at its failover priority, pushed by the target
    watches (``watch=True``: the refresh loop waits for the next push, no polling)."""

    def __init__(self, service: str, watches: tuple[tuple[_TargetWatch, int], ...], *, wait: float = DEFAULT_WAIT):
        names = ", ".join(watch.target.id for watch, _ in watches)
        super().__init__(service, f"Consul discovery chain targets {names}", wait=wait)
        self._watches = watches
        for watch, _ in watches:
            watch.subscribe(self._target_changed)
        if all(watch.settled for watch, _ in watches):
            self._generation = 1  # shared watches already answered: the first resolve answers at once

    def _target_changed(self) -> None:
        if all(watch.settled for watch, _ in self._watches):
            self._pushed()

    def _answer_locked(self) -> Resolution:
        self._seen = self._generation
        endpoints: list[Endpoint] = []
        errors: list[str] = []
        answered = False
        for watch, priority in self._watches:
            answer = watch.answer
            if answer is None:
                if watch.error is not None:
                    errors.append(f"{watch.target.id}: {watch.error}")
                continue
            answered = True
            endpoints.extend(
                endpoint if endpoint.priority == priority else _at_priority(endpoint, priority)
                for endpoint in answer.endpoints
            )
        if not answered and not self._closed:
            raise DiscoveryError(
                "; ".join(errors) or "no answer from Consul yet for any target",
                service=self.service,
                source=self.source,
            )
        return Resolution(tuple(endpoints), ttl=None, watch=True)

    def _release(self) -> None:
        for watch, _ in self._watches:
            watch.unsubscribe(self._target_changed)


def _at_priority(endpoint: Endpoint, priority: int) -> Endpoint:
    return dataclasses.replace(endpoint, priority=priority)


# -- the source -------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Chain:
    """One ``consul+chain://`` service: its placeholder, its chain watch and the mapping in force."""

    key: str
    name: str
    target: str
    placeholder: ChainPlaceholder
    loop: _Loop | None = None
    mapping: ChainMapping | None = None
    version: str = ""
    error: str | None = None


@dataclass(frozen=True, slots=True)
class _Installed:
    """What a chain service was built from (rebuilt when any of it changes)."""

    config: ServiceConfig
    targets: tuple[tuple[ChainTarget, int], ...]


class ConsulChainSource:
    """Consul's discovery chains for one client (see the module docstring).

    ``mesh`` is the client's mesh transport (held weakly). ``register_tls(service_key, chooser)`` gives a chain
    service's endpoints their TLS context (``chooser(endpoint)``), and ``connect`` is the client's Consul identity
    (:class:`~meshlib.security.consul_ca.ConsulCASource`, ``MESHLIB_CONSUL_SERVICE``) or ``None``: then targets
    are discovered with ``/v1/health/service`` and called as the URL says.
    """

    def __init__(
        self,
        mesh: Any,
        config: MeshConfig,
        register_tls: Callable[[str, Any], None] | None = None,
        *,
        connect: ConsulCASource | None = None,
        options: WatchOptions | None = None,
        wait: float = 300.0,
    ) -> None:
        from meshlib.discovery.consul.agent import ConsulAgent
        from meshlib.discovery.consul.health import zone_key_from_env
        from meshlib.discovery.consul.query import WatchOptions

        self._mesh = weakref.ref(mesh)
        self._config = config
        self._register_tls = register_tls
        self._connect = connect
        environ = os.environ if config.environ is None else config.environ
        self.agent = ConsulAgent.from_env(environ)  # a bad CONSUL_* value is a ConfigError now
        self._zone_key = zone_key_from_env(environ)  # MESHLIB_CONSUL_ZONE_KEY: the instances' zone metadata key
        self._options = options or WATCH_OPTIONS or WatchOptions()
        self._wait = wait
        self._chains: dict[str, _Chain] = {}
        for key, svc in config.services.items():
            if scheme_of(svc.target) != "consul+chain":
                continue
            placeholder = mesh.services[key].resolver
            assert isinstance(placeholder, ChainPlaceholder)
            self._chains[key] = _Chain(key, svc.name, svc.target, placeholder)
        self._targets: dict[tuple[str, bool], _TargetWatch] = {}
        self._installed: dict[str, _Installed] = {}
        #: Installed services no chain names any more, and since when (``time.monotonic()``): they linger.
        self._lingering: dict[str, float] = {}
        self._events: queue.SimpleQueue[tuple[str, Any] | None] = queue.SimpleQueue()
        self._status_lock = threading.Lock()
        self._applied = 0
        self._closed = False
        self._pid = os.getpid()
        self._thread: threading.Thread | None = None
        #: Every loop started (the finalizer's: a client dropped unclosed must not leave its watches running).
        self._live: list[_Loop] = []
        self._finalizer = weakref.finalize(mesh, ConsulChainSource._stop_all, self._events, self._live)
        self._finalizer.atexit = False

    # -- lifecycle --------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Watch every chain and start applying what comes."""
        self._thread = threading.Thread(target=self._run, name="meshlib-consul-chain-apply", daemon=True)
        self._thread.start()
        for chain in self._chains.values():
            self._watch_chain(chain)

    def close(self) -> None:
        """End every watch and the apply thread, and wait for their threads (bounded): once closed, nothing of
        this source queries the agent or logs (the installed routes stay as they are)."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        if self._pid != os.getpid():
            return  # a forked child that never resumed: the loops are the parent's
        self._events.put(None)
        deadline = time.monotonic() + 5
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)  # then no watch starts any more (the apply thread starts them)
        loops = self._loops()
        ConsulChainSource._stop_all(self._events, loops)
        for loop in loops:  # each ends at once (its query in flight is interrupted)
            loop.join(deadline)

    def _loops(self) -> list[_Loop]:
        return list(self._live)

    @staticmethod
    def _stop_all(events: queue.SimpleQueue[Any], loops: list[_Loop]) -> None:
        events.put(None)
        for loop in loops:
            loop.stop()

    def after_fork(self, mesh: Any) -> None:
        """In a forked child (only this thread runs): the mesh was rebuilt from configuration; the parent's HTTP
        clients are abandoned (never used or closed here), and every watch starts again in this process, from the
        last answers (installed at once, so the child routes as the parent did)."""
        _ABANDONED.append(list(self._live))
        self._mesh = weakref.ref(mesh)
        self._pid = os.getpid()
        self._events = queue.SimpleQueue()
        self._status_lock = threading.Lock()
        old_targets, self._targets = self._targets, {}
        self._installed = {}
        self._lingering = {}
        for chain in self._chains.values():
            placeholder = mesh.services[chain.key].resolver
            assert isinstance(placeholder, ChainPlaceholder)
            chain.placeholder = placeholder
            chain.loop = None
        self._live = []
        self._finalizer = weakref.finalize(mesh, ConsulChainSource._stop_all, self._events, self._live)
        self._finalizer.atexit = False
        if self._closed:
            return
        del old_targets
        self._thread = threading.Thread(target=self._run, name="meshlib-consul-chain-apply", daemon=True)
        self._thread.start()
        self._events.put(("apply", None))
        for chain in self._chains.values():
            self._watch_chain(chain)

    # -- status -----------------------------------------------------------------------------------------------------

    def status(self) -> list[ConsulChainStatus]:
        """Each chain: the version in force, whether it routes, why not, its backends and what is not honoured."""
        with self._status_lock:
            found = []
            for chain in list(self._chains.values()):
                mapping = chain.mapping
                backends = (
                    {}
                    if mapping is None
                    else {config.name: [t.id for t, _ in targets] for config, targets in mapping.services.values()}
                )
                found.append(
                    ConsulChainStatus(
                        chain.name,
                        chain.target,
                        chain.version,
                        mapping is not None and chain.placeholder.pending.is_set(),
                        chain.error,
                        backends,
                        [] if mapping is None else list(mapping.unsupported),
                    )
                )
            return found

    @property
    def applied(self) -> int:
        """How many times a new table was installed."""
        return self._applied

    # -- the chain watches (their threads) --------------------------------------------------------------------------

    def _watch_chain(self, chain: _Chain) -> None:
        from meshlib.discovery.consul.query import BlockingQuery, ConsulQuery

        placeholder = chain.placeholder
        params = list(placeholder.params)
        for key, value in (("ns", self.agent.namespace), ("partition", self.agent.partition)):
            if value and all(k != key for k, _ in params):
                params.append((key, value))
        query = BlockingQuery(
            ConsulQuery(placeholder.chain, passing=False, stale=False, wait=self._wait),
            self.agent,
            self._options,
            service=chain.name,
            source=f"Consul discovery chain of {placeholder.chain}",
            path=CHAIN_PATH + quote(placeholder.chain, safe=""),
            params=params,
        )
        chain.loop = _Loop(f"chain-{placeholder.chain}", query, self.agent)
        self._live.append(chain.loop)
        chain.loop.start(lambda loop: self._chain_loop(chain, loop))

    def _orphaned(self, loop: _Loop) -> bool:
        """``True`` (and the loop stopped) once the client's mesh is gone: a watch never outlives its client, even
        should its finalizer not have reached this loop (the finalizer stops every loop it knows at once)."""
        if self._mesh() is not None:
            return False
        loop.stop()
        self._events.put(None)  # and the apply thread
        return True

    def _chain_loop(self, chain: _Chain, loop: _Loop) -> None:
        from meshlib.control.consul.chain import ChainError, map_chain, parse_chain_json

        query = loop.query
        events = self._events
        last: bytes | None = None
        while (reply := loop.next_reply()) is not None and not self._orphaned(loop):
            try:
                query.document(reply)  # the status and JSON checks, errors and backoff
            except DiscoveryError as error:
                events.put(("error", (chain.key, error)))
                continue
            version = reply.headers.get("x-consul-index", "")
            query.accept(reply)
            query.recovered()
            if reply.body == last:
                continue  # the index moved for something else
            last = reply.body
            try:
                mapping = map_chain(parse_chain_json(reply.body), called=chain.name, version=version)
            except ChainError as error:
                events.put(("refused", (chain.key, f"{error} (X-Consul-Index {version})")))
                continue
            events.put(("chain", (chain.key, mapping, version)))

    def _target_loop(self, watch: _TargetWatch, loop: _Loop) -> None:
        query = loop.query
        while (reply := loop.next_reply()) is not None and not self._orphaned(loop):
            try:
                answer = query.on_reply(reply)
            except DiscoveryError as error:
                if watch.error is None or str(watch.error) != str(error):
                    log = logger.error if isinstance(error, ConsulACLError) else logger.warning
                    log("Consul target %s: %s (its last instances keep serving)", watch.target.id, error)
                watch.deliver(None, error)
                continue
            watch.deliver(answer, None)

    def _watch_target(self, target: ChainTarget) -> _TargetWatch:
        from meshlib.discovery.consul.query import BlockingQuery, ConsulQuery

        connect = self._connect is not None and not target.external
        key = (target.id, connect)
        found = self._targets.get(key)
        if found is not None:
            return found
        query = ConsulQuery(
            target.service,
            dc=target.datacenter or None,
            passing=target.only_passing,
            wait=self._wait,
            filter=target.filter or None,
            ns=target.namespace or None,
            partition=target.partition or None,
            peer=target.peer or None,
            connect=connect,
            zone_key=self._zone_key,
        )
        subset = target.subset_filter
        select = None if subset is None else (lambda entries: [e for e in entries if _matches(subset, e)])
        blocking = BlockingQuery(
            query,
            self.agent,
            self._options,
            service=target.service,
            source=f"Consul target {target.id}",
            select=select,
        )
        watch = _TargetWatch(key, target, _Loop(f"target-{target.id}", blocking, self.agent))
        self._targets[key] = watch
        if not self._closed:  # closing: the watch is made (the apply finishes) but never queries
            self._live.append(watch.loop)
            watch.loop.start(lambda loop: self._target_loop(watch, loop))
        return watch

    # -- the apply thread ---------------------------------------------------------------------------------------------

    def _run(self) -> None:
        events = self._events
        while True:
            try:
                item = events.get(timeout=CHAIN_LINGER / 2 if self._lingering else None)
            except queue.Empty:  # time to retire services that lingered long enough
                item = ("apply", None)
            if item is None or self._mesh() is None:  # closed, or the client is gone (its finalizer stops the rest)
                return
            batch = take_batch(events, item)  # a burst of answers is applied together: one swap
            if batch is None:
                return
            try:
                changed = False
                for kind, value in batch:
                    changed = self._record(kind, value) or changed
                if changed:
                    self._apply()
            except Exception:
                logger.exception("applying a Consul discovery chain failed; the previous routes keep serving")

    def _record(self, kind: str, value: Any) -> bool:
        """Note one event; ``True`` when the routes must be computed again."""
        if kind == "apply":
            return True
        key = value[0]
        chain = self._chains[key]
        if kind == "chain":
            _, mapping, version = value
            with self._status_lock:
                chain.mapping, chain.version, chain.error = mapping, version, None
            return True
        if kind == "refused":
            why = value[1]
            with self._status_lock:
                chain.error = why
            if chain.mapping is None:
                self._unroutable(chain, f"the Consul discovery chain of {chain.name} cannot be used: {why}")
            else:
                logger.error(
                    "Consul discovery chain %s refused; the chain of X-Consul-Index %s keeps serving: %s",
                    chain.name,
                    chain.version,
                    why,
                )
            return False
        error: DiscoveryError = value[1]
        with self._status_lock:
            chain.error = str(error)
        if chain.mapping is None and isinstance(error, ConsulACLError):
            self._unroutable(chain, str(error))  # a refused token will not fix itself: fail calls now
        elif chain.mapping is not None:
            logger.warning(
                "Consul discovery chain %s: %s; the chain of X-Consul-Index %s keeps serving",
                chain.name,
                error,
                chain.version,
            )
        return False

    def _unroutable(self, chain: _Chain, why: str) -> None:
        placeholder = chain.placeholder
        if placeholder.why != why:
            logger.error("Consul service %s (%s) cannot be routed: %s", chain.name, chain.target, why)
        placeholder.why = why
        placeholder.pending.set()

    def _apply(self) -> None:
        """Install the routes of every chain with the services they name, in one swap; release the others."""
        mesh = self._mesh()
        if mesh is None or self._closed:
            return
        parts: list[RouteTable] = []
        wanted: dict[str, _Installed] = {}
        for chain in self._chains.values():
            mapping = chain.mapping
            if mapping is None:
                continue
            parts.append(mapping.table)
            for key, (config, targets) in mapping.services.items():
                timeout = mapping.connect_timeouts.get(key)
                bounded = config if timeout is None else dataclasses.replace(config, connect_timeout=timeout)
                wanted[key] = _Installed(bounded, targets)
        added: dict[str, tuple[ServiceConfig, Any]] = {}
        replaced: dict[str, tuple[ServiceConfig, Any]] = {}
        for key, want in wanted.items():
            before = self._installed.get(key)
            if before == want:
                continue
            (replaced if before is not None else added)[key] = self._service_for(key, want)
        mesh.apply_control_plane(merge_tables(parts, "consul"), added, replaced, source="consul")
        now = time.monotonic()
        for key in wanted:
            self._lingering.pop(key, None)
        for key in self._installed:
            if key not in wanted:
                self._lingering.setdefault(key, now)
        newest_first = sorted(self._lingering, key=self._lingering.__getitem__, reverse=True)
        dropped = [
            key
            for index, key in enumerate(newest_first)
            if index >= MAX_LINGERING or now - self._lingering[key] >= CHAIN_LINGER
        ]
        for key in dropped:
            del self._lingering[key]
        self._installed = {**{key: self._installed[key] for key in self._lingering}, **wanted}
        if dropped:
            mesh.remove_services(dropped)
        used = {
            (target.id, self._connect is not None and not target.external)
            for want in self._installed.values()
            for target, _ in want.targets
        }
        for unused in [target_key for target_key in self._targets if target_key not in used]:
            loop = self._targets.pop(unused).loop
            loop.stop()
            with contextlib.suppress(ValueError):
                self._live.remove(loop)
        with self._status_lock:
            self._applied += 1
        for chain in self._chains.values():
            if chain.mapping is not None:
                chain.placeholder.why = None
                chain.placeholder.pending.set()
        logger.debug("Consul: installed the chains of %s (%d services)", ", ".join(sorted(self._chains)), len(wanted))

    def _service_for(self, key: str, want: _Installed) -> tuple[ServiceConfig, Any]:
        """A chain service's settings and resolver, and its endpoints' TLS (mTLS with a Consul identity)."""
        watches = tuple((self._watch_target(target), priority) for target, priority in want.targets)
        config = want.config
        connect = self._connect
        if connect is not None and self._register_tls is not None and any(not t.external for t, _ in want.targets):
            by_priority: dict[int, Any] = {}
            for target, priority in want.targets:
                if target.external:
                    continue
                identity = connect.upstream(
                    target.service,
                    namespace=target.namespace or None,
                    datacenter=target.datacenter or None,
                    partition=target.partition or None,
                )
                by_priority[priority] = connect.client_context(identity, target.sni or None)
            fallback = by_priority[min(by_priority)]
            self._register_tls(key, lambda endpoint: by_priority.get(endpoint.priority, fallback))
            config = dataclasses.replace(config, tls_required=True)
        return config, ChainEndpoints(config.name, watches)


def _matches(subset: Any, entry: Any) -> bool:
    """A target's subset filter over one health entry; an entry it cannot read is left out (never widened)."""
    try:
        return bool(subset.matches(entry)) if isinstance(entry, Mapping) else False
    except Exception:  # a malformed entry: not one of the subset's instances
        return False


#: What forked children inherited and must neither use nor close.
_ABANDONED: list[object] = []
