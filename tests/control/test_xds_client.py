"""AdsClient against a small ADS server on loopback (grpcio + xds-protos): subscriptions, ACK, NACK (A46), deletion,
does-not-exist, fail-static reconnect. (To move onto tests/servers/xds.py once that double lands.)"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import pytest

grpc = pytest.importorskip("grpc")
ads_pb2_grpc = pytest.importorskip("envoy.service.discovery.v3.ads_pb2_grpc")
from envoy.config.cluster.v3 import cluster_pb2  # noqa: E402
from envoy.config.core.v3 import base_pb2  # noqa: E402
from envoy.service.discovery.v3 import discovery_pb2  # noqa: E402
from google.protobuf import any_pb2  # noqa: E402

from meshlib.control.xds.client import CLUSTER, AdsClient, ResourceState, XdsResourceError  # noqa: E402

pytestmark = pytest.mark.timeout(30)


class Clusters:
    """Decodes Clusters; a cluster named ``bad-*`` is invalid (its lb_policy field, say)."""

    type_url = CLUSTER
    all_in_response = True

    def decode(self, resource: Any) -> tuple[str, object]:
        cluster = cluster_pb2.Cluster()
        resource.Unpack(cluster)
        if cluster.name.startswith("bad-"):
            error = XdsResourceError("lb_policy", "unsupported")
            error.name = cluster.name  # type: ignore[attr-defined]
            raise error
        return cluster.name, cluster.connect_timeout.seconds


class Server(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """Answers each CDS request with the current snapshot; records every request."""

    def __init__(self) -> None:
        self.requests: queue.Queue[Any] = queue.Queue()
        self.streams: list[queue.Queue[Any]] = []
        self.snapshot: tuple[str, list[cluster_pb2.Cluster]] = ("", [])
        self.nonce = 0
        self.lock = threading.Lock()

    def push(self, version: str, clusters: list[cluster_pb2.Cluster]) -> None:
        with self.lock:
            self.snapshot = (version, clusters)
            for outbox in self.streams:
                outbox.put(self._response())

    def _response(self) -> Any:
        self.nonce += 1
        version, clusters = self.snapshot
        resources = []
        for cluster in clusters:
            packed = any_pb2.Any()
            packed.Pack(cluster)
            resources.append(packed)
        return discovery_pb2.DiscoveryResponse(
            version_info=version, resources=resources, type_url=CLUSTER, nonce=str(self.nonce)
        )

    def StreamAggregatedResources(self, request_iterator: Iterator[Any], context: Any) -> Iterator[Any]:
        outbox: queue.Queue[Any] = queue.Queue()
        with self.lock:
            self.streams.append(outbox)

        def read() -> None:
            try:
                for request in request_iterator:
                    self.requests.put(request)
                    if not request.response_nonce:  # a (re)subscription: answer with the snapshot
                        with self.lock:
                            outbox.put(self._response())
            except Exception:
                pass
            outbox.put(None)

        threading.Thread(target=read, daemon=True).start()
        while True:
            item = outbox.get()
            if item is None:
                return
            yield item


def cluster(name: str, seconds: int = 1) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name)
    c.connect_timeout.seconds = seconds
    return c


@pytest.fixture
def server() -> Iterator[tuple[Server, int, Any]]:
    servicer = Server()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield servicer, port, grpc_server
    grpc_server.stop(None)


def client(port: int, **options: Any) -> AdsClient:
    return AdsClient(
        f"127.0.0.1:{port}",
        lambda: grpc.insecure_channel(f"127.0.0.1:{port}"),
        base_pb2.Node(id="test"),
        {CLUSTER: Clusters()},
        backoff=(0.05, 1.6, 0.2, 0.2),
        **options,
    )


def next_request(servicer: Server, *, nonce: str | None = None) -> Any:
    while True:
        request = servicer.requests.get(timeout=10)
        if nonce is None or request.response_nonce == nonce:
            return request


def test_subscribe_ack_then_nack_keeps_the_valid_and_the_last_good(server: tuple[Server, int, Any]) -> None:
    servicer, port, _ = server
    servicer.snapshot = ("1", [cluster("a", 1), cluster("b", 2)])
    seen: queue.Queue[ResourceState] = queue.Queue()
    ads = client(port)
    try:
        ads.watch(CLUSTER, "a", seen.put)
        first = next_request(servicer)
        assert first.node.id == "test" and list(first.resource_names) == ["a"] and first.version_info == ""
        state = seen.get(timeout=10)
        assert (state.name, state.value, state.version, state.status) == ("a", 1, "1", "ACKED")
        ack = next_request(servicer, nonce="1")
        assert ack.version_info == "1" and not ack.HasField("error_detail")

        servicer.push("2", [cluster("a", 5), cluster("bad-b")])  # a valid change and an invalid resource
        changed = seen.get(timeout=10)
        assert (changed.value, changed.version) == (5, "2")  # A46: the valid resource applies
        nack = next_request(servicer, nonce="2")
        assert nack.version_info == "1"  # NACK: the last accepted version
        assert "bad-b" in nack.error_detail.message and "lb_policy" in nack.error_detail.message
    finally:
        ads.close()


def test_a_cluster_missing_from_a_response_is_deleted(server: tuple[Server, int, Any]) -> None:
    servicer, port, _ = server
    servicer.snapshot = ("1", [cluster("a")])
    seen: queue.Queue[ResourceState] = queue.Queue()
    ads = client(port)
    try:
        ads.watch(CLUSTER, "a", seen.put)
        assert seen.get(timeout=10).status == "ACKED"
        servicer.push("2", [])
        gone = seen.get(timeout=10)
        assert (gone.status, gone.value) == ("DOES_NOT_EXIST", None)
    finally:
        ads.close()


def test_a_name_never_answered_is_reported_as_not_existing(server: tuple[Server, int, Any]) -> None:
    servicer, port, _ = server
    servicer.snapshot = ("1", [cluster("other")])
    seen: queue.Queue[ResourceState] = queue.Queue()
    ads = client(port, does_not_exist_timeout=0.2)
    try:
        ads.watch(CLUSTER, "missing", seen.put)
        state = seen.get(timeout=10)
        assert (state.name, state.status) == ("missing", "DOES_NOT_EXIST")
    finally:
        ads.close()


def test_fail_static_across_a_server_restart_and_resubscription(server: tuple[Server, int, Any]) -> None:
    servicer, port, grpc_server = server
    servicer.snapshot = ("1", [cluster("a", 1)])
    seen: queue.Queue[ResourceState] = queue.Queue()
    ads = client(port)
    try:
        ads.watch(CLUSTER, "a", seen.put)
        assert seen.get(timeout=10).value == 1
        grpc_server.stop(None)  # the control plane goes away
        assert [s.value for s in ads.resources()] == [1]  # the accepted resource stays
        restarted = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(servicer, restarted)
        assert restarted.add_insecure_port(f"127.0.0.1:{port}") == port
        servicer.snapshot = ("2", [cluster("a", 7)])
        restarted.start()
        try:
            state = seen.get(timeout=10)
            assert (state.value, state.version) == (7, "2")  # resubscribed on the new stream, and re-synced
            assert ads.connection().streams >= 2
        finally:
            restarted.stop(None)
    finally:
        ads.close()
