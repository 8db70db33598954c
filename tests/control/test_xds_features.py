"""Each thing issue 13 says comes from the control plane, end to end through a real ``meshlib.Client``.

``MESHLIB_SERVICE_PAYMENTS=xds:///payments`` plus the bootstrap of the ADS double (``tests/servers/xds.py``), real
loopback backends behind the clusters (:class:`meshlib.testing.Backend`, slowed or failing with ``Behavior``). One
test per feature: retries (A44), the route timeout (A31), fault injection (A33), balancing policy (A42/A48 and
meshlib's custom policy), circuit breaking (A32), outlier detection (A50 as cds.py maps it), upstream TLS (A29),
LOGICAL_DNS and aggregate clusters (A37), and EDS ``drop_overloads`` (A27's cluster_impl). Each asserts what the
backends saw and what the caller got (counts, statuses, errors), never durations. The module runs on both HTTP
libraries (``MESHLIB_HTTP_LIBRARY``).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import meshlib
from meshlib.testing import Backend, Behavior
from tests.conftest import BackendFactory, LogWatch
from tests.httplib import httpx

pytest.importorskip("grpc")

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.clusters.aggregate.v3 import cluster_pb2 as aggregate_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import percent_pb2
from xds.type.v3 import typed_struct_pb2

from meshlib.control.xds.client import CLUSTER, CLUSTER_LOAD_ASSIGNMENT, LISTENER, ROUTE_CONFIGURATION
from meshlib.deadline import DEADLINE_HEADER, decode_timeout
from tests.control import xds_builders as b
from tests.security.pki import CA
from tests.servers import xds_resources as r
from tests.servers.xds import XdsServer

FAULT = "envoy.filters.http.fault"
FAIL = Behavior(status=503)


@pytest.fixture
def xds() -> Iterator[XdsServer]:
    with XdsServer() as server:
        yield server


def client_for(xds: XdsServer, *, environ: dict[str, str] | None = None, **bootstrap: Any) -> meshlib.Client:
    """A sync client of ``xds:///payments`` (``bootstrap`` adds fields to the bootstrap)."""
    return meshlib.Client(environ=env(xds, environ, **bootstrap))


def env(xds: XdsServer, extra: dict[str, str] | None = None, **bootstrap: Any) -> dict[str, str]:
    return {
        "GRPC_XDS_BOOTSTRAP_CONFIG": xds.bootstrap_json(**bootstrap),
        "MESHLIB_SERVICE_PAYMENTS": "xds:///payments",
        **(extra or {}),
    }


def eps(backends: list[Backend], host: str = "127.0.0.1", **options: Any) -> list[Any]:
    return [r.endpoint(host, backend.port, **options) for backend in backends]


def push(
    xds: XdsServer,
    routes: list[Any],
    clusters: list[Any],
    assignments: dict[str, list[Backend]] | None = None,
    *,
    filters: Sequence[Any] = (),
) -> None:
    """LDS ``payments`` (with ``filters`` before the router) -> RDS ``payments-routes`` -> ``clusters`` -> EDS
    (``assignments``: cluster -> its backends, one locality; ``None``: the test sets EDS itself)."""
    if assignments is not None:
        xds.set(
            CLUSTER_LOAD_ASSIGNMENT,
            [r.cluster_load_assignment(name, [r.locality(eps(bs))]) for name, bs in assignments.items()],
        )
    xds.set(CLUSTER, clusters)
    xds.set(
        ROUTE_CONFIGURATION, [r.route_configuration("payments-routes", [r.virtual_host("vh", ["payments"], routes)])]
    )
    xds.set(LISTENER, [r.listener("payments", rds="payments-routes", http_filters=list(filters))])


def served(backends: list[Backend]) -> list[int]:
    return [backend.count for backend in backends]


def in_background(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``call`` on a thread; its result (or exception) lands in the returned list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(call())
        except BaseException as error:  # handed to the test
            out.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


# -- 1. retry_policy (A44) ------------------------------------------------------------------------------------------


def retry_route(prefix: str, cluster: str, retry_on: str, num_retries: int) -> Any:
    route = r.route(prefix=prefix, cluster=cluster)
    route.route.retry_policy.CopyFrom(rc.RetryPolicy(retry_on=retry_on))
    route.route.retry_policy.num_retries.value = num_retries
    route.route.retry_policy.retry_back_off.base_interval.CopyFrom(b.seconds(0.001))
    return route


def test_retry_policy_retries_what_it_names_and_never_resends_a_post(
    xds: XdsServer, start_backends: BackendFactory
) -> None:
    """Each part has its own cluster and endpoint, so no endpoint fails often enough to trip its breaker."""
    errors, gateway, posts = (start_backends(1, behavior=Behavior(status=500)) for _ in range(3))
    flaky, healthy = start_backends(1, behavior=FAIL), start_backends(1)
    routes = [
        retry_route("/5xx", "errors", "5xx", 3),
        retry_route("/gw", "gateway", "gateway-error", 3),
        retry_route("/post", "posts", "5xx", 2),
        retry_route("/", "mixed", "gateway-error", 1),
    ]
    clusters = [r.cluster(name) for name in ("errors", "gateway", "posts", "mixed")]
    push(xds, routes, clusters, {"errors": errors, "gateway": gateway, "posts": posts, "mixed": flaky + healthy})
    with client_for(xds) as client:
        # 5xx with num_retries 3: a 500 (which meshlib's own default does not retry) is tried 4 times.
        assert client.get("http://payments/5xx").status_code == 500
        assert errors[0].count == 4
        # gateway-error does not cover 500: one attempt.
        assert client.get("http://payments/gw").status_code == 500
        assert gateway[0].count == 1
        # A POST may have reached the server: never sent again, whatever retry_on says...
        assert client.post("http://payments/post", content=b"charge").status_code == 500
        assert posts[0].count == 1
        # ...unless it carries an Idempotency-Key (meshlib's safety rule, not the control plane's).
        keyed = client.post("http://payments/post", content=b"charge", headers={"Idempotency-Key": "k1"})
        assert keyed.status_code == 500 and posts[0].count == 4
        # A 503 from one endpoint is retried on the other: every call is served.
        for _ in range(6):
            assert client.get("http://payments/charge").status_code == 200
    assert healthy[0].count == 6 and 1 <= flaky[0].count <= 5


# -- 2. route timeout (A31) -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["max_stream_duration", "grpc_timeout_header_max"])
def test_max_stream_duration_bounds_the_call(xds: XdsServer, start_backends: BackendFactory, field: str) -> None:
    """The client's own timeout is 60 s and the backend answers after 30 s: only the route's bound fails it.
    (A first call on an unbounded route warms the cluster: endpoints known, connection open.)"""
    backend = start_backends(1)
    bounded = r.route(prefix="/", cluster="pay")
    getattr(bounded.route.max_stream_duration, field).CopyFrom(b.seconds(0.25))
    bounded.route.retry_policy.CopyFrom(rc.RetryPolicy(retry_on="unknown-token"))  # no retries: one attempt
    push(xds, [r.route(prefix="/warm", cluster="pay"), bounded], [r.cluster("pay")], {"pay": backend})
    with client_for(xds, environ={"MESHLIB_TIMEOUT": "60s"}) as client:
        assert client.get("http://payments/warm").status_code == 200
        backend[0].behavior = Behavior(delay=30)
        with pytest.raises(meshlib.DeadlineExceeded, match="the last attempt timed out"):
            client.get("http://payments/slow")
    assert backend[0].count == 2
    budget = decode_timeout(backend[0].requests[1].headers[DEADLINE_HEADER])  # what the backend was told
    assert budget is not None and 0 < budget <= 0.25


# -- 3. fault injection (A33) ---------------------------------------------------------------------------------------


def test_fault_filter_aborts_and_delays_per_route(xds: XdsServer, start_backends: BackendFactory) -> None:
    backend = start_backends(1)
    no_fault = b.any_of(b.fault())
    delayed = r.route(prefix="/delayed", cluster="pay")
    delayed.typed_per_filter_config[FAULT].CopyFrom(b.any_of(b.fault(delay=30)))
    delayed.route.max_stream_duration.max_stream_duration.CopyFrom(b.seconds(0.2))
    spared = r.route(prefix="/spared", cluster="pay")
    spared.typed_per_filter_config[FAULT].CopyFrom(no_fault)
    routes = [delayed, spared, r.route(prefix="/", cluster="pay")]
    push(xds, routes, [r.cluster("pay")], {"pay": backend}, filters=[b.http_filter(FAULT, b.fault(abort=503))])
    with client_for(xds) as client:
        for _ in range(10):
            assert client.get("http://payments/charge").status_code == 503  # the Listener's filter: abort 100 %
        assert backend[0].count == 0
        with pytest.raises(meshlib.DeadlineExceeded, match="fault filter"):
            client.get("http://payments/delayed")  # the route's override: a delay longer than the route allows
        assert backend[0].count == 0
        assert client.get("http://payments/spared").status_code == 200  # an empty override: no fault
    assert backend[0].count == 1


# -- 4. lb_policy ---------------------------------------------------------------------------------------------------


def test_ring_hash_follows_the_routes_hash_header(xds: XdsServer, start_backends: BackendFactory) -> None:
    backends = start_backends(4)
    push(
        xds,
        [r.route(cluster="pay", hash_header="x-user")],
        [r.cluster("pay", lb_policy="ring_hash")],
        {"pay": backends},
    )
    with client_for(xds) as client:
        owners: dict[str, set[str]] = {}
        for user in range(16):
            for _ in range(4):
                response = client.get("http://payments/", headers={"x-user": f"user-{user}"})
                owners.setdefault(f"user-{user}", set()).add(response.json()["backend"])
    assert all(len(owner) == 1 for owner in owners.values()), owners  # one value, one endpoint
    assert len({next(iter(owner)) for owner in owners.values()}) > 1  # different values spread


def p2c_ewma_cluster(name: str) -> Any:
    cluster = r.cluster(name)
    policy = cluster.load_balancing_policy.policies.add()
    policy.typed_extension_config.name = "meshlib"
    policy.typed_extension_config.typed_config.Pack(
        typed_struct_pb2.TypedStruct(type_url="type.googleapis.com/meshlib.p2c_ewma")
    )
    return cluster


@pytest.mark.parametrize("policy", ["least_request", "p2c_ewma"])
def test_load_aware_policies_avoid_the_busy_endpoint(
    xds: XdsServer, start_backends: BackendFactory, log_event: LogWatch, policy: str
) -> None:
    """A call is held by the slow endpoint, then a second endpoint is pushed: least_request (and meshlib's
    p2c_ewma) send every new call to the idle one; round robin would send about half to the busy one."""
    slow, fast = start_backends(1, behavior=Behavior(delay=30)), start_backends(1)
    cluster = r.cluster("pay", lb_policy="least_request") if policy == "least_request" else p2c_ewma_cluster("pay")
    push(xds, [r.route(cluster="pay")], [cluster], {"pay": slow})
    with client_for(xds, environ={"MESHLIB_TIMEOUT": "60s"}) as client:
        held, _ = in_background(lambda: client.get("http://payments/held"))
        assert slow[0].wait_for(1, 10)
        assert client.mesh.services["XDS_CLUSTER:PAY"].lb_name == policy
        applied = log_event("endpoints of service xds-cluster:pay changed: 2 now")
        xds.set(CLUSTER_LOAD_ASSIGNMENT, [r.cluster_load_assignment("pay", [r.locality(eps(slow + fast))])])
        assert applied.wait(10)
        for _ in range(10):
            assert client.get("http://payments/quick").status_code == 200
        assert served(slow + fast) == [1, 10]
        slow[0].stop()  # the held call ends
        held.join(10)


# -- 5. circuit_breakers (A32) --------------------------------------------------------------------------------------


def test_max_requests_refuses_the_call_over_the_limit(xds: XdsServer, start_backends: BackendFactory) -> None:
    slow = start_backends(1, behavior=Behavior(delay=30))
    push(xds, [r.route(cluster="pay")], [r.cluster("pay", max_requests=2)], {"pay": slow})
    with client_for(xds) as client:
        threads = [in_background(lambda: client.get("http://payments/slow")) for _ in range(2)]
        assert slow[0].wait_for(2, 10)
        with pytest.raises(
            meshlib.OverloadedError,
            match=r"2 requests already in flight \(circuit_breakers max_requests of xDS cluster pay\)",
        ):
            client.get("http://payments/third")
        assert slow[0].count == 2
        slow[0].stop()
        for thread, _ in threads:
            thread.join(10)


# -- 6. outlier_detection (A50, consecutive_5xx) ---------------------------------------------------------------------


def test_consecutive_5xx_ejects_the_failing_endpoint(xds: XdsServer, start_backends: BackendFactory) -> None:
    failing, healthy = start_backends(1, behavior=FAIL), start_backends(1)
    cluster = r.cluster("pay")
    cluster.outlier_detection.consecutive_5xx.value = 2
    cluster.outlier_detection.max_ejection_percent.value = 50
    no_retry = r.route(cluster="pay")
    no_retry.route.retry_policy.CopyFrom(rc.RetryPolicy(retry_on="unknown-token"))
    push(xds, [no_retry], [cluster], {"pay": failing + healthy})
    with client_for(xds) as client:
        statuses = [client.get("http://payments/").status_code for _ in range(40)]
    assert failing[0].count == 2  # the cluster's threshold (meshlib's own default is 5)
    assert statuses.count(503) == 2 and healthy[0].count == 38


def test_failure_percentage_from_the_cluster_ejects_a_gray_endpoint(
    xds: XdsServer, start_backends: BackendFactory, log_event: LogWatch
) -> None:
    """The cluster's rate-based settings reach the service's detector and the client's sweep (A50)."""
    backends = start_backends(6)
    gray = backends[0]
    gray.behavior = Behavior(fail_fraction=0.3)  # 30 % fast 500s, never two in a row: no consecutive ejection
    ejected = log_event(f"ejected ('127.0.0.1', {gray.port})")
    cluster = r.cluster("pay")
    od = cluster.outlier_detection
    od.interval.FromMilliseconds(100)
    od.enforcing_success_rate.value = 0  # only failure percentage, which the cluster turns on
    od.enforcing_failure_percentage.value = 100
    od.failure_percentage_threshold.value = 25
    od.failure_percentage_request_volume.value = 5
    no_retry = r.route(cluster="pay")
    no_retry.route.retry_policy.CopyFrom(rc.RetryPolicy(retry_on="unknown-token"))
    push(xds, [no_retry], [cluster], {"pay": backends})
    with client_for(xds) as client:
        for _ in range(20_000):  # bounded: only "did not hang"
            client.get("http://payments/")
            if ejected.is_set():
                break
        assert ejected.is_set()
        reasons = {e.address: e.ejected_reason for service in client.mesh_status().services for e in service.endpoints}
    assert reasons[gray.address] == "failure-percentage"
    assert [reason for reason in reasons.values() if reason] == ["failure-percentage"]


# -- 7. upstream TLS (A29) ------------------------------------------------------------------------------------------


def tls_cluster(name: str, san: str) -> Any:
    cluster = r.cluster(name)
    context = tls_pb2.UpstreamTlsContext()
    common = context.common_tls_context
    common.tls_certificate_provider_instance.instance_name = "mesh"
    common.validation_context.ca_certificate_provider_instance.instance_name = "mesh"
    common.validation_context.match_subject_alt_names.append(string_pb2.StringMatcher(exact=san))
    cluster.transport_socket.name = "envoy.transport_sockets.tls"
    cluster.transport_socket.typed_config.Pack(context)
    return cluster


def test_upstream_tls_from_certificate_providers_checks_the_san(
    xds: XdsServer, tmp_path: Path, start_backends: BackendFactory
) -> None:
    from tests.security.pki import server_context

    ca = CA("mesh CA")
    client_cert, client_key = ca.issue(uris=("spiffe://mesh.test/ns/web/sa/web",)).write(tmp_path, "client")
    providers = {
        "mesh": {
            "plugin_name": "file_watcher",
            "config": {
                "certificate_file": str(client_cert),
                "private_key_file": str(client_key),
                "ca_certificate_file": str(ca.write(tmp_path / "ca.pem")),
            },
        }
    }
    right = ca.issue("127.0.0.1", uris=("spiffe://mesh.test/ns/pay/sa/payments",), common_name="right")
    wrong = ca.issue("127.0.0.1", uris=("spiffe://mesh.test/ns/pay/sa/intruder",), common_name="wrong")
    good = Backend("good", ssl_context=server_context(right, tmp_path, client_ca=ca)).start()
    bad = Backend("bad", ssl_context=server_context(wrong, tmp_path, client_ca=ca)).start()
    try:
        san = "spiffe://mesh.test/ns/pay/sa/payments"
        routes = [r.route(prefix="/bad", cluster="bad"), r.route(prefix="/", cluster="good")]
        push(xds, routes, [tls_cluster("good", san), tls_cluster("bad", san)], {"good": [good], "bad": [bad]})
        with client_for(xds, certificate_providers=providers) as client:
            for _ in range(3):
                assert client.get("http://payments/charge").status_code == 200
            with pytest.raises(httpx.ConnectError, match="TLS peer identity of xds-cluster:bad rejected"):
                client.get("http://payments/bad")
        assert good.count == 3 and bad.count == 0
        # Over TLS, with the client certificate of the provider (the backend requires one).
        assert good.requests[0].peercert is not None
    finally:
        good.stop()
        bad.stop()


# -- 8. LOGICAL_DNS and aggregate clusters (A37) -------------------------------------------------------------------


def logical_dns(name: str, host: str, port: int) -> Any:
    cluster = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.LOGICAL_DNS)
    socket = cluster.load_assignment.endpoints.add().lb_endpoints.add().endpoint.address.socket_address
    socket.address, socket.port_value = host, port
    socket.protocol = address_pb2.SocketAddress.TCP
    return cluster


def aggregate(name: str, *children: str) -> Any:
    cluster = cluster_pb2.Cluster(name=name)
    cluster.cluster_type.name = "envoy.clusters.aggregate"
    cluster.cluster_type.typed_config.Pack(aggregate_pb2.ClusterConfig(clusters=list(children)))
    return cluster


def test_logical_dns_cluster_resolves_its_host(xds: XdsServer, start_backends: BackendFactory) -> None:
    """A LOGICAL_DNS cluster's host is asked of meshlib's DNS client (here a dnsmasq on loopback); a second
    cluster's name that does not exist fails its calls with the DNS reason."""
    from tests.discovery.conftest import require_dnsmasq
    from tests.servers.dnsmasq import Dnsmasq

    backend = start_backends(1)
    routes = [r.route(prefix="/missing", cluster="missing"), r.route(prefix="/", cluster="dns")]
    clusters = [logical_dns("dns", "payments.internal", backend[0].port), logical_dns("missing", "nope.internal", 1)]
    with Dnsmasq(hosts={"payments.internal": ["127.0.0.1"]}, binary=require_dnsmasq()) as dns:
        push(xds, routes, clusters)
        with client_for(xds, environ={"MESHLIB_DNS_SERVERS": f"{dns.host}:{dns.port}"}) as client:
            for _ in range(3):
                assert client.get("http://payments/").status_code == 200
            with pytest.raises(meshlib.NoEndpointsError, match=r"nope\.internal does not exist"):
                client.get("http://payments/missing")
    assert backend[0].count == 3


def test_aggregate_cluster_fails_over_to_the_next_cluster(
    xds: XdsServer, start_backends: BackendFactory, log_event: LogWatch
) -> None:
    """[primary, secondary]: the secondary serves while the primary has no healthy endpoint; a push that makes
    the primary healthy takes the traffic back (the aggregate follows its leaves' pushes)."""
    primary, secondary = start_backends(1), start_backends(1)

    def assignments(primary_health: Any) -> list[Any]:
        return [
            r.cluster_load_assignment("primary", [r.locality(eps(primary, health=primary_health))]),
            r.cluster_load_assignment("secondary", [r.locality(eps(secondary))]),
        ]

    xds.set(CLUSTER_LOAD_ASSIGNMENT, assignments("UNHEALTHY"))
    clusters = [aggregate("agg", "primary", "secondary"), r.cluster("primary"), r.cluster("secondary")]
    push(xds, [r.route(cluster="agg")], clusters)
    with client_for(xds) as client:
        for _ in range(5):
            assert client.get("http://payments/").status_code == 200
        assert served(primary + secondary) == [0, 5]  # the primary has no healthy endpoint
        back = log_event("endpoints of service xds-cluster:agg changed: 2 now")
        xds.set(CLUSTER_LOAD_ASSIGNMENT, assignments("HEALTHY"))
        assert back.wait(10)
        for _ in range(5):
            assert client.get("http://payments/").status_code == 200
    assert served(primary + secondary) == [5, 5]


@pytest.mark.anyio
async def test_aggregate_cluster_on_the_async_client(xds: XdsServer, start_backends: BackendFactory) -> None:
    """The aggregate's resolver waits for its leaves on the event loop (asyncio, trio)."""
    primary, secondary = start_backends(1), start_backends(1)
    xds.set(
        CLUSTER_LOAD_ASSIGNMENT,
        [
            r.cluster_load_assignment("primary", [r.locality(eps(primary, health="UNHEALTHY"))]),
            r.cluster_load_assignment("secondary", [r.locality(eps(secondary))]),
        ],
    )
    clusters = [aggregate("agg", "primary", "secondary"), r.cluster("primary"), r.cluster("secondary")]
    push(xds, [r.route(cluster="agg")], clusters)
    async with meshlib.AsyncClient(environ=env(xds)) as client:
        for _ in range(3):
            assert (await client.get("http://payments/")).status_code == 200
    assert served(primary + secondary) == [0, 3]


# -- 9. EDS drop_overloads -----------------------------------------------------------------------------------------


def with_drops(name: str, backends: list[Backend], **per_million: int) -> Any:
    assignment = r.cluster_load_assignment(name, [r.locality(eps(backends))])
    for category, rate in per_million.items():
        assignment.policy.drop_overloads.add(
            category=category,
            drop_percentage=percent_pb2.FractionalPercent(
                numerator=rate, denominator=percent_pb2.FractionalPercent.MILLION
            ),
        )
    return assignment


def test_drop_overloads_fail_calls_at_once_without_reaching_a_backend(
    xds: XdsServer, start_backends: BackendFactory
) -> None:
    backend = start_backends(1)
    push(xds, [r.route(cluster="pay")], [r.cluster("pay")])
    xds.set(CLUSTER_LOAD_ASSIGNMENT, [with_drops("pay", backend, never=0, throttle=1_000_000)])
    with client_for(xds) as client:
        for _ in range(5):
            with pytest.raises(meshlib.OverloadedError, match="drop category 'throttle'") as raised:
                client.get("http://payments/")
        assert raised.value.service == "xds-cluster:pay"
        assert backend[0].count == 0
        drops = client.mesh.services["XDS_CLUSTER:PAY"].drops
        assert drops is not None and drops.counts() == {"throttle": 5}
        pushed: queue.Queue[Any] = queue.Queue()
        client.mesh.xds.clients[0].watch(CLUSTER_LOAD_ASSIGNMENT, "pay", pushed.put)  # after the resolver's watch
        pushed.get(timeout=10)  # the current state
        xds.set(CLUSTER_LOAD_ASSIGNMENT, [with_drops("pay", backend, never=0)])
        pushed.get(timeout=10)  # the resolver heard the push first: its drops are swapped
        assert client.get("http://payments/").status_code == 200
        for _ in range(5):
            assert client.get("http://payments/").status_code == 200
    assert backend[0].count == 6


@pytest.mark.anyio
async def test_drop_overloads_apply_to_the_async_client(xds: XdsServer, start_backends: BackendFactory) -> None:
    backend = start_backends(1)
    push(xds, [r.route(cluster="pay")], [r.cluster("pay")])
    xds.set(CLUSTER_LOAD_ASSIGNMENT, [with_drops("pay", backend, lb=1_000_000)])
    async with meshlib.AsyncClient(environ=env(xds)) as client:
        with pytest.raises(meshlib.OverloadedError, match="drop category 'lb'"):
            await client.get("http://payments/")
    assert backend[0].count == 0


# -- max_connection_duration (the cluster's maximum connection age) --------------------------------------------------


def test_max_connection_duration_retires_the_clusters_connections(
    xds: XdsServer, start_backends: BackendFactory
) -> None:
    backends = start_backends(1)
    cluster = r.cluster("pay")
    cluster.common_http_protocol_options.max_connection_duration.CopyFrom(b.seconds(0.000001))  # every reuse is late
    push(xds, [r.route(cluster="pay")], [cluster], {"pay": backends})
    with client_for(xds) as client:  # the environment sets no maximum age: the cluster's applies
        for _ in range(3):
            assert client.get("http://payments/").status_code == 200
        assert backends[0].wait_closed(2), "the aged connections were not retired"
    assert backends[0].connections_total == 3  # each request on a new connection


def test_without_max_connection_duration_the_connection_is_reused(
    xds: XdsServer, start_backends: BackendFactory
) -> None:
    backends = start_backends(1)
    push(xds, [r.route(cluster="pay")], [r.cluster("pay")], {"pay": backends})
    with client_for(xds) as client:
        for _ in range(3):
            assert client.get("http://payments/").status_code == 200
        assert backends[0].connections_total == 1
