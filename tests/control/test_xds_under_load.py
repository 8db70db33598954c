"""xDS pushes and a control-plane restart while a client is under load (issue 13): 0 failed requests.

Four threads (or four tasks, for the async client) call ``http://payments/`` in a loop through one client steered
by the ADS double (``tests/servers/xds.py``) to real loopback backends, counting every answer by the backend that
served it (``x-backend``) and every failure. While they run, a test pushes a RouteConfiguration, a Cluster or a
ClusterLoadAssignment that fails validation, a route to a cluster whose CDS resource is missing or rejected, or
stops and restarts the control plane; it asserts that the NACK reaches the server naming the field, that no request
failed, and that traffic stays where the last accepted configuration sends it (or moves when a good push comes).

Every wait is on a condition: a request reaching the server (the double's condition variable), or a call
completing (the load's), each bounded by a generous timeout; nothing sleeps and nothing is timed.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import pytest

import meshlib
from meshlib.control.xds import client as ads
from meshlib.control.xds.client import CLUSTER, CLUSTER_LOAD_ASSIGNMENT, LISTENER, ROUTE_CONFIGURATION
from meshlib.testing import Backend
from tests.anyio_backends import asyncio_and_trio  # noqa: F401
from tests.conftest import BackendFactory
from tests.servers import xds_resources as r
from tests.servers.xds import XdsServer

pytest.importorskip("grpc")

WAIT = 30.0  # seconds: "did not hang", never a timing assertion
V1, V2 = "pay-v1", "pay-v2"


@pytest.fixture
def xds(monkeypatch: pytest.MonkeyPatch) -> Iterator[XdsServer]:
    # gRPC's reconnect backoff starts at 1 s; the restart tests assert what happens while the stream is down and
    # after it is back, not how long the backoff is (that is the ADS client's own tests' business).
    monkeypatch.setattr(ads, "BACKOFF", (0.05, 1.6, 0.2, 1.0))
    with XdsServer() as server:
        yield server


def env(xds: XdsServer) -> dict[str, str]:
    return {"GRPC_XDS_BOOTSTRAP_CONFIG": xds.bootstrap_json(), "MESHLIB_SERVICE_PAYMENTS": "xds:///payments"}


def assignment(cluster: str, backends: list[Backend]) -> Any:
    return r.cluster_load_assignment(cluster, [r.locality([r.endpoint("127.0.0.1", b.port) for b in backends])])


def routes(weights: dict[str, int] | None = None, *, cluster: str | None = None) -> Any:
    """``payments-routes``: everything to ``cluster``, or split over ``weights``."""
    route = r.route(prefix="/", cluster=cluster) if cluster else r.route(prefix="/", weighted_clusters=weights)
    return r.route_configuration("payments-routes", [r.virtual_host("vh", ["payments"], [route])])


def push(xds: XdsServer, v1: list[Backend], v2: list[Backend], weights: dict[str, int]) -> str:
    """Listener -> ``payments-routes`` (split by ``weights``) -> pay-v1 / pay-v2 -> EDS; the RDS version."""
    xds.set(CLUSTER_LOAD_ASSIGNMENT, [assignment(V1, v1), assignment(V2, v2)])
    xds.set(CLUSTER, [r.cluster(V1), r.cluster(V2)])
    version = xds.set(ROUTE_CONFIGURATION, [routes(weights)])
    xds.set(LISTENER, [r.listener("payments", rds="payments-routes")])
    return version


class Load:
    """``threads`` threads calling ``http://payments/load`` until stopped: answers counted by backend, failures kept.

    Every completed call notifies :attr:`cond`, so a test waits for "N more calls" or "the client's state is now
    X" (checked as calls complete) without sleeping.
    """

    def __init__(self, client: meshlib.Client, threads: int = 4) -> None:
        self.cond = threading.Condition()
        self.served: Counter[str] = Counter()
        self.failures: list[str] = []
        self._client = client
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, name=f"load-{i}", daemon=True) for i in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(WAIT)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                response = self._client.get("http://payments/load")
                ok = response.status_code == 200
                outcome = response.headers.get("x-backend", "?") if ok else f"HTTP {response.status_code}"
            except Exception as error:
                ok, outcome = False, repr(error)
            self.record(ok, outcome)

    def record(self, ok: bool, outcome: str) -> None:
        with self.cond:
            if ok:
                self.served[outcome] += 1
            else:
                self.failures.append(outcome)
            self.cond.notify_all()

    def total(self) -> int:
        return sum(self.served.values()) + len(self.failures)

    def snapshot(self) -> Counter[str]:
        with self.cond:
            return Counter(self.served)

    def wait_until(self, predicate: Callable[[], bool], what: str) -> None:
        """Wait (as calls complete) until ``predicate()`` holds."""
        with self.cond:
            if not self.cond.wait_for(predicate, WAIT):
                raise AssertionError(f"{what}: not within {WAIT} s (served {self.served}, failed {self.failures[:5]})")

    def more(self, n: int) -> Counter[str]:
        """Wait for ``n`` more completed calls; the answers counted since, by backend."""
        with self.cond:
            start, before = self.total(), Counter(self.served)
        self.wait_until(lambda: self.total() >= start + n, f"{n} more calls")
        return self.snapshot() - before


def applied(client: Any) -> int:
    """How many tables the client's xDS source has installed."""
    return int(client.mesh.xds.status().applied)


@pytest.fixture
def backends(start_backends: BackendFactory) -> tuple[list[Backend], list[Backend]]:
    """pay-v1: two backends (``v1-0``, ``v1-1``); pay-v2: one (``v2-0``)."""
    return start_backends(2, prefix="v1-"), start_backends(1, prefix="v2-")


def steady(load: Load) -> Counter[str]:
    """200 calls under the 100/0 split: every one on pay-v1, both its endpoints, nothing failed."""
    moved = load.more(200)
    assert load.failures == []
    assert set(moved) == {"v1-0", "v1-1"}, moved
    return moved


def test_a_nacked_route_configuration_under_load_fails_no_request(
    xds: XdsServer, backends: tuple[list[Backend], list[Backend]]
) -> None:
    v1, v2 = backends
    push(xds, v1, v2, {V1: 100, V2: 0})
    with meshlib.Client(environ=env(xds)) as client, Load(client) as load:
        steady(load)
        before, mark = applied(client), xds.mark()
        bad = r.route(prefix="/", weighted_clusters={V1: 0, V2: 100})  # would move everything to v2...
        bad.match.ClearField("prefix")
        bad.match.safe_regex.regex = "("  # ...but is not a regex: the RouteConfiguration is NACKed
        config = r.route_configuration("payments-routes", [r.virtual_host("vh", ["payments"], [bad])])
        version = xds.set(ROUTE_CONFIGURATION, [config])
        message = xds.wait_for_nack(ROUTE_CONFIGURATION, version, after=mark, timeout=WAIT)
        assert "payments-routes" in message and "safe_regex.regex" in message
        load.wait_until(lambda: applied(client) > before, "the NACKed state went through the apply thread")
        steady(load)  # the last accepted routes: 100/0, no failure
        assert client.mesh.xds.status().services[0].routed


def test_a_nacked_cluster_under_load_keeps_its_last_accepted_settings(
    xds: XdsServer, backends: tuple[list[Backend], list[Backend]]
) -> None:
    from envoy.config.cluster.v3 import cluster_pb2

    v1, v2 = backends
    push(xds, v1, v2, {V1: 100, V2: 0})
    with meshlib.Client(environ=env(xds)) as client, Load(client) as load:
        steady(load)
        service = client.mesh.services["XDS_CLUSTER:PAY_V1"]
        assert service.lb_name == "round_robin"
        before, mark = applied(client), xds.mark()
        bad = r.cluster(V1)
        bad.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED  # not a policy gRPC (or meshlib) supports: NACK
        version = xds.set(CLUSTER, [bad, r.cluster(V2)])
        message = xds.wait_for_nack(CLUSTER, version, after=mark, timeout=WAIT)
        assert "pay-v1" in message and "lb_policy" in message and "CLUSTER_PROVIDED" in message
        load.wait_until(lambda: applied(client) > before, "the NACKed state went through the apply thread")
        steady(load)
        assert client.mesh.services["XDS_CLUSTER:PAY_V1"] is service  # not rebuilt, not dropped
        assert service.lb_name == "round_robin"
        assert cds_status(client, V1) == "NACKED"


def cds_status(client: Any, name: str) -> str | None:
    """The status ``mesh_status().xds`` gives the Cluster ``name`` (``None``: not listed)."""
    status = client.mesh.xds.status()
    found = [res.status for srv in status.servers for res in srv.resources if res.type == "CDS" and res.name == name]
    return found[0] if found else None


def test_a_nacked_load_assignment_under_load_keeps_the_endpoints(
    xds: XdsServer, backends: tuple[list[Backend], list[Backend]]
) -> None:
    v1, v2 = backends
    push(xds, v1, v2, {V1: 100, V2: 0})
    with meshlib.Client(environ=env(xds)) as client, Load(client) as load:
        steady(load)
        resolver = client.mesh.services["XDS_CLUSTER:PAY_V1"].resolver
        endpoints = resolver.current().endpoints
        assert {e.port for e in endpoints} == {b.port for b in v1}
        mark = xds.mark()
        bad = assignment(V1, v2)  # would send pay-v1's share to v2-0...
        bad.endpoints[0].lb_endpoints.append(r.endpoint("not-an-ip", 80))  # ...but is invalid: NACK
        version = xds.set(CLUSTER_LOAD_ASSIGNMENT, [bad, assignment(V2, v2)])
        message = xds.wait_for_nack(CLUSTER_LOAD_ASSIGNMENT, version, after=mark, timeout=WAIT)
        assert "pay-v1" in message and "socket_address.address" in message and "not-an-ip" in message
        states = {s.name: s for s in client.mesh.xds.clients[0].resources()}
        load.wait_until(lambda: states[V1].status == "NACKED", "the client recorded the NACK")
        steady(load)
        assert resolver.current().endpoints == endpoints
        assert client.mesh.services["XDS_CLUSTER:PAY_V1"].resolver is resolver


@pytest.mark.parametrize("cds", ["never sent", "nacked"])
def test_a_route_to_a_cluster_without_an_accepted_cds_resource_does_not_half_apply_under_load(
    xds: XdsServer, backends: tuple[list[Backend], list[Backend]], start_backends: BackendFactory, cds: str
) -> None:
    """The new routes send everything to pay-v3, whose Cluster is missing (or rejected): the previous table keeps
    serving, with no failure, until a valid pay-v3 comes; then traffic moves there."""
    from envoy.config.cluster.v3 import cluster_pb2

    v1, v2 = backends
    v3 = start_backends(1, prefix="v3-")
    push(xds, v1, v2, {V1: 100, V2: 0})
    with meshlib.Client(environ=env(xds)) as client, Load(client) as load:
        steady(load)
        mark = xds.mark()
        if cds == "nacked":
            bad = r.cluster("pay-v3")
            bad.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
            xds.set(CLUSTER, [r.cluster(V1), r.cluster(V2), bad])  # no stream asks for pay-v3 yet: nothing sent
        version = xds.set(ROUTE_CONFIGURATION, [routes(cluster="pay-v3")])
        xds.wait_for_ack(ROUTE_CONFIGURATION, version, after=mark, timeout=WAIT)
        xds.wait_for(lambda q: q.type_url == CLUSTER and "pay-v3" in q.resource_names, after=mark, timeout=WAIT)
        if cds == "nacked":
            message = xds.wait_for_nack(CLUSTER, after=mark, timeout=WAIT)
            assert "pay-v3" in message and "lb_policy" in message
            load.wait_until(lambda: cds_status(client, "pay-v3") == "NACKED", "the client took the NACK")
        steady(load)  # the new routes are held: the previous table serves, nothing fails
        assert client.mesh.xds.status().waiting_for == ["pay-v3"]
        xds.set(CLUSTER_LOAD_ASSIGNMENT, [assignment(V1, v1), assignment(V2, v2), assignment("pay-v3", v3)])
        xds.set(CLUSTER, [r.cluster(V1), r.cluster(V2), r.cluster("pay-v3")])
        load.wait_until(lambda: load.served["v3-0"] > 0, "traffic moved to pay-v3")
        load.more(20)  # calls that had picked v1 before the swap finish
        moved = load.more(200)
        assert load.failures == []
        assert set(moved) == {"v3-0"}, moved


def test_a_control_plane_restart_under_load_fails_no_request(
    xds: XdsServer, backends: tuple[list[Backend], list[Backend]]
) -> None:
    """Fail-static: while the control plane is down the accepted routes serve; the client reconnects on its own,
    subscribes again to everything, and a push after the restart moves traffic."""
    v1, v2 = backends
    push(xds, v1, v2, {V1: 100, V2: 0})
    with meshlib.Client(environ=env(xds)) as client, Load(client) as load:
        steady(load)
        ads = client.mesh.xds.clients[0]
        streams = ads.connection().streams
        last_stream = max(q.stream for q in xds.requests)
        xds.stop()
        load.wait_until(lambda: not ads.connection().connected, "the client saw the stream end")
        steady(load)  # the control plane is down: the accepted configuration serves
        mark = xds.mark()
        xds.start()  # the same port, the same resources
        # Everything the client watched, again (pay-v2 has weight 0: dropped from the routes, not watched).
        subscribed = {LISTENER: {"payments"}, ROUTE_CONFIGURATION: {"payments-routes"}}
        subscribed |= {CLUSTER: {V1}, CLUSTER_LOAD_ASSIGNMENT: {V1}}
        for type_url, names in subscribed.items():
            resent = xds.wait_for(
                lambda q, t=type_url: q.stream > last_stream and q.type_url == t, after=mark, timeout=WAIT
            )
            assert names <= set(resent.resource_names), resent
        load.wait_until(lambda: ads.connection().connected, "the client reconnected")
        assert ads.connection().streams > streams  # (attempts while the port was closed count too)
        assert xds.open_streams == 1  # one stream again, not one per attempt
        steady(load)
        mark = xds.mark()
        version = xds.set(ROUTE_CONFIGURATION, [routes({V1: 0, V2: 100})])
        xds.wait_for_ack(ROUTE_CONFIGURATION, version, after=mark, timeout=WAIT)
        load.wait_until(lambda: load.served["v2-0"] > 0, "traffic moved to pay-v2")
        load.more(20)
        moved = load.more(200)
        assert load.failures == []
        assert set(moved) == {"v2-0"}, moved


class AsyncLoad(Load):
    """:class:`Load` with ``tasks`` tasks of an :class:`meshlib.AsyncClient` on the running loop."""

    def __init__(self, client: meshlib.AsyncClient, tasks: int = 4) -> None:
        super().__init__(client, 0)  # type: ignore[arg-type]
        self._aclient = client
        self._tasks = tasks
        self._group: Any = None

    async def __aenter__(self) -> AsyncLoad:
        import anyio

        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        for _ in range(self._tasks):
            self._group.start_soon(self._aloop)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        await self._group.__aexit__(kind, error, tb)

    async def _aloop(self) -> None:
        from anyio.lowlevel import checkpoint

        while not self._stop.is_set():
            try:
                response = await self._aclient.get("http://payments/load")
                ok = response.status_code == 200
                outcome = response.headers.get("x-backend", "?") if ok else f"HTTP {response.status_code}"
            except Exception as error:
                ok, outcome = False, repr(error)
            self.record(ok, outcome)
            await checkpoint()  # a call that fails at once never yields: the other tasks and the loop must run


@pytest.mark.anyio
async def test_the_async_client_under_load_through_a_nack_and_a_control_plane_restart(
    xds: XdsServer, backends: tuple[list[Backend], list[Backend]]
) -> None:
    """The async client (asyncio and trio): a NACKed RouteConfiguration, then a restart of the control plane, with
    no failed call; a push after the restart moves traffic. The test's waits run on worker threads."""
    from anyio import to_thread

    v1, v2 = backends
    push(xds, v1, v2, {V1: 100, V2: 0})

    def scenario(client: meshlib.AsyncClient, load: Load) -> None:
        steady(load)
        mark = xds.mark()
        bad = r.route(prefix="/", weighted_clusters={V1: 0, V2: 100})
        bad.match.ClearField("prefix")
        bad.match.safe_regex.regex = "("
        version = xds.set(
            ROUTE_CONFIGURATION, [r.route_configuration("payments-routes", [r.virtual_host("vh", ["payments"], [bad])])]
        )
        assert "safe_regex.regex" in xds.wait_for_nack(ROUTE_CONFIGURATION, version, after=mark, timeout=WAIT)
        steady(load)
        ads = client.mesh.xds.clients[0]
        last_stream = max(q.stream for q in xds.requests)
        xds.stop()
        load.wait_until(lambda: not ads.connection().connected, "the client saw the stream end")
        steady(load)
        mark = xds.mark()
        xds.start()
        xds.wait_for(lambda q: q.stream > last_stream and q.type_url == CLUSTER_LOAD_ASSIGNMENT, after=mark)
        version = xds.set(ROUTE_CONFIGURATION, [routes({V1: 0, V2: 100})])
        load.wait_until(lambda: load.served["v2-0"] > 0, "traffic moved to pay-v2")
        load.more(20)
        moved = load.more(200)
        assert load.failures == []
        assert set(moved) == {"v2-0"}, moved
        assert xds.version(ROUTE_CONFIGURATION) == version

    async with meshlib.AsyncClient(environ=env(xds)) as client, AsyncLoad(client) as load:
        await to_thread.run_sync(scenario, client, load)
