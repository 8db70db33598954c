"""The xDS double's protocol, checked with a hand-driven ADS stream (grpcio + xds-protos' stub).

Each test plays the client's side of "xDS REST and gRPC protocol" step by step (requests with chosen names,
versions and nonces) and asserts what the double answers, or that it answers nothing. The double's record of
requests is written under the same lock as its decision, so once a request is recorded its answer (if any) is
queued: "no answer" is checked without sleeping.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("envoy.service.discovery.v3.ads_pb2_grpc")
import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from tests.servers import xds_resources as r
from tests.servers.xds import CDS, EDS, LDS, RDS, XdsServer

pytestmark = [pytest.mark.timeout(30), pytest.mark.one_library]


class AdsStream:
    """One ADS stream from a test: :meth:`send` a DiscoveryRequest, :meth:`recv` the next DiscoveryResponse."""

    def __init__(self, address: str, node_id: str = "raw-client") -> None:
        self.channel = grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)])
        self._out: queue.Queue[Any] = queue.Queue()
        self._node_id = node_id
        self._first = True
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self._call = stub.StreamAggregatedResources(iter(self._out.get, None))
        self._in: queue.Queue[Any] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for response in self._call:
                self._in.put(response)
        except grpc.RpcError as error:
            self._in.put(error)

    def send(
        self, type_url: str, names: tuple[str, ...] = (), version: str = "", nonce: str = "", error: str = ""
    ) -> None:
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url, resource_names=list(names), version_info=version, response_nonce=nonce
        )
        if self._first:
            request.node.id = self._node_id
            self._first = False
        if error:
            request.error_detail.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
            request.error_detail.message = error
        self._out.put(request)

    def recv(self, timeout: float = 10.0) -> Any:
        """The next response; ``queue.Empty`` if none comes within ``timeout``, the error if the stream ended."""
        item = self._in.get(timeout=timeout)
        if isinstance(item, grpc.RpcError):
            raise item
        return item

    def ack(self, response: Any, names: tuple[str, ...]) -> None:
        self.send(response.type_url, names, version=response.version_info, nonce=response.nonce)

    def close(self) -> None:
        self._out.put(None)
        self.channel.close()


@pytest.fixture
def xds() -> Iterator[XdsServer]:
    with XdsServer() as server:
        yield server


@pytest.fixture
def stream(xds: XdsServer) -> Iterator[AdsStream]:
    client = AdsStream(xds.address)
    yield client
    client.close()


def names_of(response: Any, message_type: Any) -> list[str]:
    out = []
    for packed in response.resources:
        message = message_type()
        assert packed.Unpack(message)
        out.append(message.name)
    return out


def listeners(*names: str) -> list[listener_pb2.Listener]:
    return [r.listener(name, rds=f"{name}-routes") for name in names]


def test_named_lds_answered_acked_and_pushed(xds: XdsServer, stream: AdsStream) -> None:
    v1 = xds.set(LDS, listeners("echo", "other"))
    stream.send(LDS, ("echo",))
    first = stream.recv()
    assert (first.type_url, first.version_info, names_of(first, listener_pb2.Listener)) == (LDS, v1, ["echo"])
    assert first.nonce
    stream.ack(first, ("echo",))
    ack = xds.wait_for_ack(LDS, v1)
    assert (ack.response_nonce, ack.node_id, ack.stale) == (first.nonce, "raw-client", False)
    assert len(xds.responses) == 1  # an ACK is not answered

    v2 = xds.set(LDS, listeners("echo"))
    pushed = stream.recv()
    assert (pushed.version_info, names_of(pushed, listener_pb2.Listener)) == (v2, ["echo"])
    assert pushed.nonce != first.nonce


def test_subscription_change_is_answered_not_only_the_first_request(xds: XdsServer, stream: AdsStream) -> None:
    xds.set(CDS, [r.cluster("a"), r.cluster("b"), r.cluster("c")])
    stream.send(CDS, ("a",))
    first = stream.recv()
    assert names_of(first, cluster_pb2.Cluster) == ["a"]
    # The ACK names one more cluster (as gRPC's client does when a route starts using it): answered at once.
    stream.send(CDS, ("a", "b"), version=first.version_info, nonce=first.nonce)
    second = stream.recv()
    assert names_of(second, cluster_pb2.Cluster) == ["a", "b"]
    assert second.version_info == first.version_info  # nothing changed on the server: same version, new nonce
    assert second.nonce != first.nonce


def test_stale_nonce_is_ignored(xds: XdsServer, stream: AdsStream) -> None:
    xds.set(CDS, [r.cluster("a"), r.cluster("b")])
    stream.send(CDS, ("a",))
    first = stream.recv()
    stream.ack(first, ("a",))
    xds.set(CDS, [r.cluster("a"), r.cluster("b")])  # a push: the stream's latest nonce moves on
    pushed = stream.recv()
    # A request answering the older response, asking for "b": stale, so recorded and not answered...
    stream.send(CDS, ("a", "b"), version=first.version_info, nonce=first.nonce)
    stale = xds.wait_for(lambda q: q.resource_names == ("a", "b"))
    assert stale.stale
    assert len(xds.responses) == 2
    # ...until the client says the same with the newest nonce.
    stream.send(CDS, ("a", "b"), version=pushed.version_info, nonce=pushed.nonce)
    assert names_of(stream.recv(), cluster_pb2.Cluster) == ["a", "b"]


def test_lds_wildcard_then_named_then_nothing(xds: XdsServer, stream: AdsStream) -> None:
    xds.set(LDS, listeners("x", "y"))
    stream.send(LDS, ())  # a first request naming nothing: legacy wildcard
    first = stream.recv()
    assert names_of(first, listener_pb2.Listener) == ["x", "y"]
    stream.send(LDS, ("x",), version=first.version_info, nonce=first.nonce)
    named = stream.recv()
    assert names_of(named, listener_pb2.Listener) == ["x"]
    stream.send(LDS, (), version=named.version_info, nonce=named.nonce)  # after naming: empty means nothing
    assert names_of(stream.recv(), listener_pb2.Listener) == []
    assert xds.subscribed(LDS) == set()


def test_explicit_wildcard_gets_new_listeners(xds: XdsServer, stream: AdsStream) -> None:
    xds.set(LDS, listeners("x"))
    stream.send(LDS, ("*",))
    first = stream.recv()
    stream.ack(first, ("*",))
    xds.set(LDS, listeners("x", "z"))
    assert names_of(stream.recv(), listener_pb2.Listener) == ["x", "z"]


def test_rds_and_eds_wait_until_the_resource_exists(xds: XdsServer, stream: AdsStream) -> None:
    stream.send(EDS, ("a",))
    xds.wait_for(lambda q: q.type_url == EDS)
    assert xds.responses == []  # an EDS answer without "a" would tell the client nothing
    version = xds.set(EDS, [r.cluster_load_assignment("a", [r.locality([r.endpoint("127.0.0.1", 1)])])])
    response = stream.recv()
    assert (response.type_url, response.version_info, len(response.resources)) == (EDS, version, 1)


def test_nack_is_recorded_and_not_resent(xds: XdsServer, stream: AdsStream) -> None:
    good = xds.set(RDS, [r.route_configuration("routes", [])])
    stream.send(RDS, ("routes",))
    first = stream.recv()
    stream.ack(first, ("routes",))
    bad = xds.set_raw(RDS, "routes", b"\xff\xff not a RouteConfiguration")
    pushed = stream.recv()
    assert pushed.version_info == bad
    assert pushed.resources[0].value == b"\xff\xff not a RouteConfiguration"
    stream.send(RDS, ("routes",), version=good, nonce=pushed.nonce, error="routes: cannot parse")
    assert xds.wait_for_nack(RDS) == "routes: cannot parse"
    assert len(xds.responses) == 2  # the rejected resources are not sent again
    with pytest.raises(TimeoutError):
        xds.wait_for_ack(RDS, bad, timeout=0.01)


def test_remove(xds: XdsServer, stream: AdsStream) -> None:
    xds.set(LDS, listeners("x", "y"))
    stream.send(LDS, ("x", "y"))
    first = stream.recv()
    stream.ack(first, ("x", "y"))
    xds.remove(LDS, "y")
    assert names_of(stream.recv(), listener_pb2.Listener) == ["x"]  # state of the world: y is gone
    with pytest.raises(KeyError, match="'y'"):
        xds.remove(LDS, "y")


def test_push_reaches_only_streams_subscribed_to_the_name(xds: XdsServer) -> None:
    xds.set(CDS, [r.cluster("a"), r.cluster("b")])
    one, two = AdsStream(xds.address, "one"), AdsStream(xds.address, "two")
    try:
        one.send(CDS, ("a",))
        two.send(CDS, ("b",))
        one.ack(one.recv(), ("a",))
        two.ack(two.recv(), ("b",))
        xds.wait_for(lambda q: q.node_id == "two" and bool(q.response_nonce))
        xds.set(CDS, [r.cluster("a"), r.cluster("b")])  # both names "changed": both streams hear
        assert names_of(one.recv(), cluster_pb2.Cluster) == ["a"]
        assert names_of(two.recv(), cluster_pb2.Cluster) == ["b"]
        before = len(xds.responses)
        xds.set_raw(CDS, "c", b"")  # nobody asked for c: no stream hears (set_raw responds before returning)
        assert len(xds.responses) == before
        assert not any("c" in response.resource_names for response in xds.responses)
    finally:
        one.close()
        two.close()


def test_restart_on_the_same_port(xds: XdsServer) -> None:
    xds.set(LDS, listeners("x"))
    port = xds.port
    before = AdsStream(xds.address)
    before.send(LDS, ("x",))
    before.recv()
    xds.stop()
    with pytest.raises(grpc.RpcError) as ended:
        before.recv()
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    before.close()
    xds.start()
    assert xds.port == port
    after = AdsStream(xds.address)
    try:
        after.send(LDS, ("x",), version="1")  # a reconnecting client says what it had
        assert names_of(after.recv(), listener_pb2.Listener) == ["x"]
        assert {q.stream for q in xds.requests} == {1, 2}
    finally:
        after.close()


def test_set_checks_the_type(xds: XdsServer) -> None:
    with pytest.raises(ValueError, match=r"envoy\.config\.cluster\.v3\.Cluster is not a .*Listener"):
        xds.set(LDS, [r.cluster("a")])
