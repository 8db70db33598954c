"""Differential tests: meshlib's traffic shares under xDS against gRPC's own xDS client, through one control plane.

The same :class:`~tests.servers.xds.XdsServer` serves the same Listener, RouteConfiguration, Clusters and
ClusterLoadAssignments to two clients at once: ``meshlib.Client`` (``MESHLIB_SERVICE_ECHO=xds:///echo``, in this
process) and grpcio's C-core xDS client (``xds:///echo``, in a subprocess: tests/servers/xds_grpc_client.py, one per
test since C-core reads its bootstrap once per process and grpcio 1.85.3 crashes when one process makes many xds:
channels). Each scenario pushes one configuration, drives calls through both, and asserts that every backend's
share of meshlib's calls is within 2 percentage points of its share of gRPC's (and both near the configured ideal).

**One endpoint, both protocols, one address.** Each logical endpoint (``e0``..``e3``) is one loopback port that
serves gRPC *and* HTTP/1.1: a small sniffing relay (:class:`DualEndpoint`) reads a connection's first bytes and
hands it to a gRPC echo server (HTTP/2 prior knowledge starts ``PRI * HTTP/2.0``) or to a meshlib.testing
``Backend`` (an HTTP/1.1 request line), both answering with the endpoint's name. So the EDS resources are byte for
byte the same for both clients, and the two clients see the same pushes at the same moment. The alternative
(gRPC and HTTP servers on two ports with EDS per client) would make the clients read different resources, and a
ring hash, which hashes endpoint addresses, would get different rings by construction.

**Sample size.** Where a client draws at random (weighted_clusters; gRPC's weighted_target between localities)
each of gRPC's endpoint shares ``p`` over ``n`` calls has standard deviation ``sqrt(p(1-p)/n)``. meshlib's draws
come from ``client.mesh.rng``, set to :class:`Evenly` (the golden-ratio sequence): its weighted shares are then
exact to about ``log(n)/n`` (0.1 point in ``N_MESH_RANDOM = 1,000`` calls; asserted within 0.5 point of ideal),
so gRPC's draws are the only noise. With ``N_GRPC_RANDOM = 12,000`` calls the worst case, ``p = 0.5`` (50/30/20),
has sigma 0.46 point; the 2-point bound minus meshlib's at most 0.5 leaves 1.5 points = 3.3 sigma (a false
failure about once in 1,000 runs per share; 4.2 sigma, 3 in 100,000, at meshlib's measured 0.1), and the 80/20 and
3:1 splits (sigma 0.37-0.40) have more margin. Round robin and priorities are deterministic in both clients, so
those scenarios compare exact shares over ``N_DETERMINISTIC`` calls after a warm-up (:func:`warm_up`: gRPC balances
over READY subchannels only). Ring hash compares, per header value, where each client sends it.

**What differs, by design** (asserted, and documented in docs/xds.md "Differential checks against gRPC"): gRPC's
round_robin ignores endpoint ``load_balancing_weight`` (meshlib honours it, as Envoy does), and the two clients'
hash rings differ, so a header value is sticky on each client but not to the same endpoint on both.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("envoy.service.discovery.v3.ads_pb2_grpc")
import grpc

import meshlib
from meshlib.testing import Backend
from tests.servers import xds_resources as r
from tests.servers.xds import CDS, EDS, LDS, RDS, XdsServer

pytestmark = [
    pytest.mark.timeout(120),
    # The shares are decided by meshlib's routing and balancing, which are the same on both HTTP libraries: the
    # module runs once, on httpx (tests/conftest.py deselects it under httpx2).
    pytest.mark.one_library,
    # The suite's slowest module (~50 s, 12,000 gRPC calls per share): opt-in, MESHLIB_TEST_SLOW=1 (docs/xds.md).
    pytest.mark.slow,
]

CLIENT = Path(__file__).parents[1] / "servers" / "xds_grpc_client.py"
NAMES = ("e0", "e1", "e2", "e3")
#: gRPC's calls where it draws at random (weighted clusters, localities): see the module docstring.
N_GRPC_RANDOM = 12_000
#: meshlib's calls there (its draws are evenly spread: :class:`Evenly`).
N_MESH_RANDOM = 1_000
#: Calls per client where both clients are deterministic (round robin, priorities).
N_DETERMINISTIC = 400
#: Header values the ring_hash scenario sends (each twice, through each client).
N_KEYS = 300
#: The bound of the issue: per backend, |meshlib share - gRPC share|.
BOUND = 0.02


class DualEndpoint:
    """One loopback port speaking gRPC and HTTP/1.1: connections whose first bytes are HTTP/2's preface go to a gRPC
    echo server, others to a meshlib.testing Backend; both answer with ``name``."""

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self.http = Backend(name).start()
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"echo-{name}"))
        handler = grpc.unary_unary_rpc_method_handler(lambda request, context: name.encode())
        self.grpc.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("echo.Echo", {"Who": handler})])
        self.grpc_port = self.grpc.add_insecure_port("127.0.0.1:0")
        self.grpc.start()
        self._loop = loop
        self._server = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._relay, "127.0.0.1", 0), loop).result(
            10
        )
        self.port: int = self._server.sockets[0].getsockname()[1]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = await reader.readexactly(3)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        port = self.grpc_port if first == b"PRI" else self.http.port
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        up_writer.write(first)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self.grpc.stop(grace=None)
        self.http.stop()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture(scope="module")
def endpoints() -> Iterator[dict[str, DualEndpoint]]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="xds-diff-relay", daemon=True)
    thread.start()
    started = {name: DualEndpoint(name, loop) for name in NAMES}
    yield started
    for endpoint in started.values():
        endpoint.close()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture
def xds() -> Iterator[XdsServer]:
    with XdsServer() as server:
        yield server


class GrpcClient:
    """grpcio's xDS client in a subprocess (tests/servers/xds_grpc_client.py), bootstrapped to ``xds``."""

    def __init__(self, xds: XdsServer) -> None:
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["GRPC_XDS_BOOTSTRAP_CONFIG"] = xds.bootstrap_json(node_id="grpcio-differential")
        env.pop("GRPC_XDS_BOOTSTRAP", None)
        self.process = subprocess.Popen(
            [sys.executable, str(CLIENT), "xds:///echo"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def receive(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, f"the grpcio client exited ({self.process.poll()})"
        answer: dict[str, Any] = json.loads(line)
        assert "error" not in answer, answer
        return answer

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        assert self.process.wait(10) == 0


@pytest.fixture
def clients(xds: XdsServer) -> Iterator[tuple[meshlib.Client, GrpcClient]]:
    """meshlib's client (seeded) and grpcio's, both bootstrapped to ``xds``, for ``xds:///echo``."""
    grpc_client = GrpcClient(xds)
    environ = {"GRPC_XDS_BOOTSTRAP_CONFIG": xds.bootstrap_json(node_id="meshlib-differential")}
    environ["MESHLIB_SERVICE_ECHO"] = "xds:///echo"
    with meshlib.Client(environ=environ) as client:
        client.mesh.rng = Evenly()
        yield client, grpc_client
    grpc_client.close()


def push(
    xds: XdsServer,
    endpoints: dict[str, DualEndpoint],
    clusters: dict[str, Sequence[Any]],
    *,
    split: dict[str, int] | None = None,
    lb_policy: r.LbPolicy = "round_robin",
    hash_header: str | None = None,
) -> None:
    """LDS ``echo`` -> RDS ``echo-routes`` (one cluster, or ``split``) -> CDS -> EDS (``clusters``: name -> its
    localities)."""
    xds.set(EDS, [r.cluster_load_assignment(name, localities) for name, localities in clusters.items()])
    xds.set(CDS, [r.cluster(name, lb_policy=lb_policy) for name in clusters])
    if split is None:
        route = r.route(prefix="/", cluster=next(iter(clusters)), hash_header=hash_header)
    else:
        route = r.route(prefix="/", weighted_clusters=split, hash_header=hash_header)
    xds.set(RDS, [r.route_configuration("echo-routes", [r.virtual_host("echo", ["echo"], [route])])])
    xds.set(LDS, [r.listener("echo", rds="echo-routes")])


def at(endpoints: dict[str, DualEndpoint], name: str, **options: Any) -> Any:
    return r.endpoint("127.0.0.1", endpoints[name].port, **options)


class Evenly(random.Random):
    """meshlib's draws, evenly spread: ``random()`` walks the golden-ratio (Weyl) sequence ``frac(x + 0.618...)``,
    whose fraction of points in any interval of length ``w`` is ``w`` to within about ``log(n)/n``; the other
    methods are a seeded ``random.Random``'s. meshlib's weighted choices (``draw = rng.random() * total``) then
    reach their ideal shares in 1,000 calls instead of the ~10,000 a pseudo-random stream needs, so gRPC's own
    draws are the only noise in a comparison."""

    STEP = (5**0.5 - 1) / 2

    def __init__(self, seed: int = 13) -> None:
        super().__init__(seed)
        self._x = 0.0

    def random(self) -> float:
        self._x = (self._x + self.STEP) % 1.0
        return self._x


def mesh_counts(client: meshlib.Client, n: int) -> Counter[str]:
    """Which endpoint answered each of ``n`` calls through meshlib (the Backend's ``x-backend`` header)."""
    counts: Counter[str] = Counter()
    for _ in range(n):
        response = client.get("http://echo/who")
        assert response.status_code == 200
        counts[response.headers["x-backend"]] += 1
    return counts


def mesh_until(client: meshlib.Client, name: str, run: int = 40, most: int = 5000) -> None:
    """Calls until ``run`` answers in a row come from ``name``: meshlib now follows the pushed configuration."""
    streak = 0
    for _ in range(most):
        streak = streak + 1 if client.get("http://echo/who").headers["x-backend"] == name else 0
        if streak >= run:
            return
    raise AssertionError(f"meshlib never sent {run} calls in a row to {name}")


def shares(counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {name: count / total for name, count in sorted(counts.items())}


def measure(
    clients: tuple[meshlib.Client, GrpcClient], names: Sequence[str], n_mesh: int, n_grpc: int
) -> tuple[dict[str, float], dict[str, float]]:
    """After :func:`warm_up` over ``names``: ``n_grpc`` calls through gRPC's client (32 in flight) while
    ``n_mesh`` go through meshlib's; each endpoint's share of each client's calls."""
    mesh, grpc_client = clients
    warm_up(clients, names)
    grpc_client.send(calls=n_grpc, parallel=32)
    ours = mesh_counts(mesh, n_mesh)
    theirs: dict[str, int] = grpc_client.receive()["counts"]
    assert sum(theirs.values()) == n_grpc
    return shares(ours), shares(theirs)


def warm_up(clients: tuple[meshlib.Client, GrpcClient], names: Sequence[str], most: int = 100) -> None:
    """Calls through both clients until each has reached every endpoint in ``names``: gRPC's round_robin and
    weighted_target pick among READY subchannels only, so calls made while some still connect would skew the
    shares."""
    mesh, grpc_client = clients
    for client in ("grpcio", "meshlib"):
        seen: set[str] = set()
        for _ in range(most):
            if client == "grpcio":
                grpc_client.send(calls=20, parallel=20)
                seen.update(grpc_client.receive()["counts"])
            else:
                seen.update(mesh_counts(mesh, 20))
            if seen >= set(names):
                break
        else:
            raise AssertionError(f"{client} never reached every one of {names} (only {seen})")


def agree(
    scenario: str,
    ideal: dict[str, float],
    ours: dict[str, float],
    theirs: dict[str, float],
    *,
    mesh_slack: float = 0.005,
    grpc_slack: float = BOUND,
) -> None:
    """Every endpoint's meshlib share within ``BOUND`` of gRPC's; meshlib's within ``mesh_slack`` of ideal and
    gRPC's within ``grpc_slack`` of it (an endpoint absent from a client's counts has share 0)."""
    report = f"{scenario}: ideal {ideal}, meshlib {ours}, grpcio {theirs}"
    print(report)
    for name in set(ideal) | set(ours) | set(theirs):
        mine, its, wanted = ours.get(name, 0.0), theirs.get(name, 0.0), ideal.get(name, 0.0)
        assert abs(mine - its) <= BOUND, report
        assert abs(mine - wanted) <= mesh_slack, report
        assert abs(its - wanted) <= grpc_slack, report


def one_locality(endpoints: dict[str, DualEndpoint], *names: str, **options: Any) -> list[Any]:
    return [r.locality([at(endpoints, name, **options) for name in names], zone="z1")]


@pytest.mark.parametrize(
    "split",
    [{"e0": 80, "e1": 20}, {"e0": 50, "e1": 30, "e2": 20}],
    ids=["80-20", "50-30-20"],
)
def test_weighted_clusters(
    xds: XdsServer,
    endpoints: dict[str, DualEndpoint],
    clients: tuple[meshlib.Client, GrpcClient],
    split: dict[str, int],
) -> None:
    """RDS ``weighted_clusters`` over one cluster per endpoint (cluster ``c-eN`` holds ``eN``)."""
    push(
        xds,
        endpoints,
        {f"c-{name}": one_locality(endpoints, name) for name in split},
        split={f"c-{name}": weight for name, weight in split.items()},
    )
    ours, theirs = measure(clients, list(split), N_MESH_RANDOM, N_GRPC_RANDOM)
    total = sum(split.values())
    agree(
        "weighted_clusters " + "/".join(map(str, split.values())),
        {k: v / total for k, v in split.items()},
        ours,
        theirs,
    )


def test_locality_weights(
    xds: XdsServer, endpoints: dict[str, DualEndpoint], clients: tuple[meshlib.Client, GrpcClient]
) -> None:
    """One cluster, two localities of one priority weighted 3:1 (gRPC's weighted_target draws; meshlib's round
    robin over endpoints weighted by their locality's share)."""
    push(
        xds,
        endpoints,
        {
            "c": [
                r.locality([at(endpoints, "e0")], weight=3, zone="z1"),
                r.locality([at(endpoints, "e1")], weight=1, zone="z2"),
            ]
        },
    )
    ours, theirs = measure(clients, ["e0", "e1"], N_DETERMINISTIC, N_GRPC_RANDOM)  # meshlib: round robin
    agree("locality weights 3:1", {"e0": 0.75, "e1": 0.25}, ours, theirs)


def test_priority_failover_and_back(
    xds: XdsServer, endpoints: dict[str, DualEndpoint], clients: tuple[meshlib.Client, GrpcClient]
) -> None:
    """Priority 0 (e0, e1) and priority 1 (e2): all traffic to priority 0; every priority-0 endpoint UNHEALTHY
    -> all to priority 1; healthy again -> all back to priority 0."""
    mesh, grpc_client = clients

    def assignment(health: r.Health) -> dict[str, list[Any]]:
        return {
            "c": [
                r.locality([at(endpoints, "e0", health=health), at(endpoints, "e1", health=health)], zone="z1"),
                r.locality([at(endpoints, "e2")], priority=1, zone="z2"),
            ]
        }

    push(xds, endpoints, assignment("HEALTHY"))
    ours, theirs = measure(clients, ["e0", "e1"], N_DETERMINISTIC, N_DETERMINISTIC)
    agree("priority 0 healthy", {"e0": 0.5, "e1": 0.5}, ours, theirs, mesh_slack=0.0, grpc_slack=0.0)

    for health, expected, ideal in (
        ("UNHEALTHY", "e2", {"e2": 1.0}),
        ("HEALTHY", "e0", {"e0": 0.5, "e1": 0.5}),
    ):
        mark = xds.mark()
        version = xds.set(EDS, [r.cluster_load_assignment("c", assignment(health)["c"])])  # type: ignore[arg-type]
        xds.wait_for_ack(EDS, version, after=mark)
        grpc_client.send(until=expected, run=1, max=5000)  # the first call that follows the push...
        mesh_until(mesh, expected, run=1)
        grpc_client.receive()
        ours, theirs = measure(clients, list(ideal), N_DETERMINISTIC, N_DETERMINISTIC)  # ...and every one after
        agree(f"priority 0 {health.lower()}", ideal, ours, theirs, mesh_slack=0.0, grpc_slack=0.0)


def test_endpoint_weights_within_a_locality(
    xds: XdsServer, endpoints: dict[str, DualEndpoint], clients: tuple[meshlib.Client, GrpcClient]
) -> None:
    """Endpoint ``load_balancing_weight`` 3:1 in one locality, round_robin: the documented difference. gRPC's
    round_robin ignores endpoint weights (A27; grpc/grpc#32004, A34 never merged), so it splits 50/50; meshlib
    honours them as Envoy does (docs/xds.md, "Weights"), 75/25. With equal weights the two agree (the cases
    above)."""
    push(xds, endpoints, {"c": [r.locality([at(endpoints, "e0", weight=3), at(endpoints, "e1", weight=1)], zone="z1")]})
    ours, theirs = measure(clients, ["e0", "e1"], N_DETERMINISTIC, N_DETERMINISTIC)
    print(f"endpoint weights 3:1 (round_robin): meshlib {ours}, grpcio {theirs}")
    assert theirs == {"e0": 0.5, "e1": 0.5}
    assert ours == {"e0": 0.75, "e1": 0.25}


def test_ring_hash_header(
    xds: XdsServer, endpoints: dict[str, DualEndpoint], clients: tuple[meshlib.Client, GrpcClient]
) -> None:
    """ring_hash with a header hash policy (A42): on each client a header value always reaches the same endpoint,
    and every endpoint owns some values. Which endpoint a value reaches differs between the two clients (about a
    third of the values agree, as for two independent rings): gRPC builds Envoy's ring (XXH64 of ``address_i``,
    about 1,024 points in all) and hashes the value with XXH64; meshlib builds its own (SHAKE-256 points, 1,024
    per weight unit, BLAKE2b keys; meshlib/balance/ring_hash.py). So a key's affinity holds per client, not across
    a fleet mixing gRPC and meshlib clients (docs/xds.md, "Differential checks against gRPC")."""
    mesh, grpc_client = clients
    push(xds, endpoints, {"c": one_locality(endpoints, "e0", "e1", "e2")}, lb_policy="ring_hash", hash_header="x-user")
    keys = [f"user-{i}" for i in range(N_KEYS)]
    picks: dict[str, list[dict[str, str]]] = {"grpcio": [], "meshlib": []}
    for _ in range(2):
        grpc_client.send(keys=keys, header="x-user")
        picks["meshlib"].append(
            {k: mesh.get("http://echo/who", headers={"x-user": k}).headers["x-backend"] for k in keys}
        )
        picks["grpcio"].append(grpc_client.receive()["picks"])
    for client, (first, second) in picks.items():
        assert first == second, f"{client}: a header value reached two endpoints"
        assert set(first.values()) == {"e0", "e1", "e2"}, f"{client}: {Counter(first.values())}"
    ours, theirs = picks["meshlib"][0], picks["grpcio"][0]
    same = sum(ours[k] == theirs[k] for k in keys) / N_KEYS
    print(
        f"ring_hash: {same:.2f} of values reach the same endpoint on both; meshlib {Counter(ours.values())}, "
        f"grpcio {Counter(theirs.values())}"
    )
