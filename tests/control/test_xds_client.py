"""AdsClient against the xDS control-plane double (tests/servers/xds.py): subscriptions, ACK, NACK with the valid
resources applied (gRFC A46), LDS/CDS deletion, does-not-exist, unsubscribe, fail-static across a restart."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import Any

import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("envoy.service.discovery.v3.ads_pb2_grpc")
from envoy.config.cluster.v3 import cluster_pb2  # noqa: E402
from envoy.config.core.v3 import base_pb2  # noqa: E402

from meshlib.control.xds.client import CLUSTER, AdsClient, ResourceState, XdsResourceError  # noqa: E402
from tests.servers import xds_resources as r  # noqa: E402
from tests.servers.xds import XdsServer  # noqa: E402

pytestmark = pytest.mark.timeout(30)


class Clusters:
    """Decodes Clusters to (lb policy, max_requests); a cluster whose lb_policy is MAGLEV is invalid."""

    type_url = CLUSTER
    all_in_response = True

    def decode(self, resource: Any) -> tuple[str, object]:
        cluster = cluster_pb2.Cluster()
        resource.Unpack(cluster)
        if cluster.lb_policy == cluster_pb2.Cluster.MAGLEV:
            raise XdsResourceError("lb_policy", "MAGLEV is not supported", name=cluster.name)
        return cluster.name, cluster_pb2.Cluster.LbPolicy.Name(cluster.lb_policy)


def maglev(name: str) -> cluster_pb2.Cluster:
    c = r.cluster(name)
    c.lb_policy = cluster_pb2.Cluster.MAGLEV
    return c


@pytest.fixture
def server() -> Iterator[XdsServer]:
    with XdsServer() as xds:
        yield xds


def client(xds: XdsServer, **options: Any) -> AdsClient:
    return AdsClient(
        xds.address,
        lambda: grpc.insecure_channel(xds.address),
        base_pb2.Node(id="meshlib-test"),
        {CLUSTER: Clusters()},
        backoff=(0.05, 1.6, 0.2, 0.2),
        **options,
    )


def test_subscribe_ack_then_nack_keeps_the_valid_and_the_last_good(server: XdsServer) -> None:
    first = server.set(CLUSTER, [r.cluster("a"), r.cluster("b", lb_policy="ring_hash")])
    seen: queue.Queue[ResourceState] = queue.Queue()
    ads = client(server)
    try:
        ads.watch(CLUSTER, "a", seen.put)
        ads.watch(CLUSTER, "b", seen.put)
        states = {s.name: s for s in (seen.get(timeout=10), seen.get(timeout=10))}
        assert {n: (s.value, s.status) for n, s in states.items()} == {
            "a": ("ROUND_ROBIN", "ACKED"),
            "b": ("RING_HASH", "ACKED"),
        }
        server.wait_for_ack(CLUSTER, first)
        assert server.requests[0].node_id == "meshlib-test"  # the node goes in the stream's first request
        mark = server.mark()
        second = server.set(CLUSTER, [r.cluster("a", lb_policy="least_request"), maglev("b")])
        message = server.wait_for_nack(CLUSTER, second, after=mark)
        assert "b" in message and "lb_policy" in message and "MAGLEV" in message
        nack = next(q for q in server.requests[mark:] if q.is_nack)
        assert nack.version_info == first  # a NACK carries the last accepted version
        by_name = {s.name: s for s in ads.resources()}
        assert (by_name["a"].value, by_name["a"].version, by_name["a"].status) == ("LEAST_REQUEST", second, "ACKED")
        assert (by_name["b"].value, by_name["b"].status) == ("RING_HASH", "NACKED")  # last good value kept
        assert "MAGLEV" in (by_name["b"].error or "")
    finally:
        ads.close()


def test_a_cluster_missing_from_a_response_is_deleted(server: XdsServer) -> None:
    server.set(CLUSTER, [r.cluster("a"), r.cluster("b")])
    seen: queue.Queue[ResourceState] = queue.Queue()
    ads = client(server)
    try:
        ads.watch(CLUSTER, "a", seen.put)
        assert seen.get(timeout=10).status == "ACKED"
        server.remove(CLUSTER, "a")
        gone = seen.get(timeout=10)
        assert (gone.status, gone.value) == ("DOES_NOT_EXIST", None)
    finally:
        ads.close()


def test_ignore_resource_deletion_keeps_a_missing_cluster(server: XdsServer) -> None:
    server.set(CLUSTER, [r.cluster("a"), r.cluster("b")])
    seen: queue.Queue[ResourceState] = queue.Queue()
    ads = client(server, ignore_resource_deletion=True)
    try:
        ads.watch(CLUSTER, "a", seen.put)
        assert seen.get(timeout=10).status == "ACKED"
        version = server.remove(CLUSTER, "a")
        server.wait_for_ack(CLUSTER, version)
        assert [(s.name, s.status, s.value) for s in ads.resources()] == [("a", "ACKED", "ROUND_ROBIN")]
    finally:
        ads.close()


def test_a_name_never_answered_is_reported_as_not_existing(server: XdsServer) -> None:
    server.set(CLUSTER, [r.cluster("other")])
    seen: queue.Queue[ResourceState] = queue.Queue()
    ads = client(server, does_not_exist_timeout=0.2)
    try:
        ads.watch(CLUSTER, "missing", seen.put)
        state = seen.get(timeout=10)
        assert (state.name, state.status) == ("missing", "DOES_NOT_EXIST")
    finally:
        ads.close()


def test_unsubscribing_tells_the_server_and_forgets_the_resource(server: XdsServer) -> None:
    server.set(CLUSTER, [r.cluster("a"), r.cluster("b")])
    seen: queue.Queue[ResourceState] = queue.Queue()
    ads = client(server)
    try:
        ads.watch(CLUSTER, "a", seen.put)
        cancel = ads.watch(CLUSTER, "b", seen.put)
        seen.get(timeout=10)
        seen.get(timeout=10)
        mark = server.mark()
        cancel()
        server.wait_for(lambda q: q.type_url == CLUSTER and q.resource_names == ("a",), after=mark)
        assert [s.name for s in ads.resources()] == ["a"]
    finally:
        ads.close()


def test_fail_static_across_a_control_plane_restart(server: XdsServer) -> None:
    server.set(CLUSTER, [r.cluster("a")])
    seen: queue.Queue[ResourceState] = queue.Queue()
    ads = client(server)
    try:
        ads.watch(CLUSTER, "a", seen.put)
        assert seen.get(timeout=10).value == "ROUND_ROBIN"
        server.stop()  # the control plane goes away
        assert [(s.value, s.status) for s in ads.resources()] == [("ROUND_ROBIN", "ACKED")]  # kept
        server.set(CLUSTER, [r.cluster("a", lb_policy="ring_hash")])
        server.start()  # same port
        state = seen.get(timeout=10)
        assert state.value == "RING_HASH"  # resubscribed on a new stream, and re-synced
        assert ads.connection().streams >= 2
    finally:
        ads.close()


def test_the_config_dump_shows_each_resource_as_csds_does(server: XdsServer) -> None:
    import json

    from meshlib.control.xds.dump import config_dump

    first = server.set(CLUSTER, [r.cluster("a"), r.cluster("b")])
    seen: queue.Queue[ResourceState] = queue.Queue()
    ads = client(server)
    try:
        ads.watch(CLUSTER, "a", seen.put)
        ads.watch(CLUSTER, "b", seen.put)
        seen.get(timeout=10)
        seen.get(timeout=10)
        mark = server.mark()
        second = server.set(CLUSTER, [r.cluster("a"), maglev("b")])
        server.wait_for_nack(CLUSTER, second, after=mark)
        dump = json.loads(json.dumps(config_dump(ads)))  # JSON all the way down
    finally:
        ads.close()
    (config,) = dump["config"]
    assert config["node"]["id"] == "meshlib-test"
    entries = {e["name"]: e for e in config["genericXdsConfigs"]}
    assert entries["a"]["clientStatus"] == "ACKED" and entries["a"]["versionInfo"] == second
    assert entries["a"]["xdsConfig"]["@type"] == CLUSTER and entries["a"]["xdsConfig"]["name"] == "a"
    assert entries["b"]["clientStatus"] == "NACKED" and entries["b"]["versionInfo"] == first
    assert "MAGLEV" in entries["b"]["errorState"]["details"]
    # The resource shown is the last good one (round robin, the default, left out of the JSON), not MAGLEV.
    assert entries["b"]["xdsConfig"]["name"] == "b" and "lbPolicy" not in entries["b"]["xdsConfig"]
    assert config["meshlib.connection"]["server"] == server.address and config["meshlib.connection"]["streams"] >= 1


def test_the_admin_endpoint_serves_the_config_dump(server: XdsServer) -> None:
    import meshlib
    from tests.httplib import httpx

    version = server.set(CLUSTER, [r.cluster("a")])
    seen: queue.Queue[ResourceState] = queue.Queue()
    ads = client(server)
    try:
        ads.watch(CLUSTER, "a", seen.put)
        seen.get(timeout=10)
        with meshlib.Client(environ={"MESHLIB_ADMIN_ADDR": "127.0.0.1:0"}) as mesh_client:
            address = mesh_client.admin_address
            assert address is not None
            with httpx.Client(trust_env=False, timeout=10) as plain:
                answer = plain.get(f"http://127.0.0.1:{address[1]}/config_dump")
    finally:
        ads.close()
    assert answer.status_code == 200
    mine = [c for c in answer.json()["config"] if c["meshlib.connection"]["server"] == server.address]
    assert len(mine) == 1
    (entry,) = mine[0]["genericXdsConfigs"]
    assert (entry["name"], entry["clientStatus"], entry["versionInfo"]) == ("a", "ACKED", version)


def test_a_wildcard_subscription_gets_every_resource_and_its_deletions(server: XdsServer) -> None:
    """``watch_all``: an empty name list (the wildcard every server understands), every cluster of each answer,
    deletions; with a named watch as well, ``*`` beside the name; invalid ones NACKed but kept out of the set."""
    server.set(CLUSTER, [r.cluster("a"), r.cluster("b")])
    seen: queue.Queue[dict[str, ResourceState]] = queue.Queue()
    ads = client(server)
    try:
        cancel = ads.watch_all(CLUSTER, seen.put)
        first = seen.get(timeout=10)
        assert {name: state.status for name, state in first.items()} == {"a": "ACKED", "b": "ACKED"}
        assert server.requests[0].resource_names == ()  # legacy wildcard
        mark = server.mark()
        server.set(CLUSTER, [r.cluster("b"), maglev("c")])
        server.wait_for_nack(CLUSTER, after=mark)
        second = seen.get(timeout=10)
        assert "a" not in second and second["b"].value == "ROUND_ROBIN"  # a deleted
        assert second["c"].status == "NACKED" and second["c"].value is None
        named: queue.Queue[ResourceState] = queue.Queue()
        mark = server.mark()
        ads.watch(CLUSTER, "b", named.put)
        request = server.wait_for(lambda q: q.type_url == CLUSTER and "b" in q.resource_names, after=mark)
        assert set(request.resource_names) == {"*", "b"}  # explicit wildcard beside the named resource
        cancel()
        request = server.wait_for(lambda q: q.type_url == CLUSTER and "*" not in q.resource_names, after=mark)
        assert request.resource_names == ("b",)
    finally:
        ads.close()
