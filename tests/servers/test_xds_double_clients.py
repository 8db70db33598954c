"""The xDS double checked against independent xDS clients: grpcio's own (gRPC C-core), and grpc-js-xds (npm).

gRPC servers on loopback answer a raw-bytes unary method with their name; the double serves LDS -> RDS -> CDS ->
EDS for ``xds:///echo``; a grpcio channel to that target (in a subprocess, since C-core reads
``GRPC_XDS_BOOTSTRAP_CONFIG`` once per process: tests/servers/xds_grpc_client.py) makes the calls. If C-core
follows the double's configuration (weighted split, locality weights, a pushed change) and ACKs every type, the
double speaks xDS as a real control plane does, and tests of meshlib against it mean something.

``test_pushed_split_moves_the_client`` (80/20 split, ACKs for every type, then a pushed 0/100 split) runs again
with ``@grpc/grpc-js-xds`` (tests/servers/node/xds_client.js, same stdin protocol) as a third opinion when ``node``
is on PATH and ``npm install`` was run in tests/servers/node; skipped otherwise. (All five tests pass with it; only
one runs because each Node process spends about 2 s loading grpc-js-xds.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("envoy.service.discovery.v3.ads_pb2_grpc")
import grpc

from tests.servers import xds_resources as r
from tests.servers.xds import CDS, EDS, LDS, RDS, XdsServer, acked_types

pytestmark = [pytest.mark.timeout(60), pytest.mark.one_library]

CLIENT = Path(__file__).with_name("xds_grpc_client.py")
NODE_DIR = Path(__file__).with_name("node")
CALLS = 1000


def echo_server(name: str) -> tuple[grpc.Server, int]:
    """A gRPC server on loopback whose ``/echo.Echo/Who`` answers ``name`` (bytes in, bytes out)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"echo-{name}"))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: name.encode())
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("echo.Echo", {"Who": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@pytest.fixture
def echo() -> Iterator[dict[str, int]]:
    """Echo servers ``a0``, ``b0``, ``b1``: name -> port."""
    servers = {name: echo_server(name) for name in ("a0", "b0", "b1")}
    yield {name: port for name, (_, port) in servers.items()}
    for server, _ in servers.values():
        server.stop(grace=None)


@pytest.fixture
def xds() -> Iterator[XdsServer]:
    with XdsServer() as server:
        yield server


class XdsClient:
    """An xDS client in a subprocess bootstrapped to the double: grpcio (``python xds_grpc_client.py``) or
    grpc-js-xds (``node node/xds_client.js``)."""

    def __init__(self, xds: XdsServer, target: str, kind: str) -> None:
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["GRPC_XDS_BOOTSTRAP_CONFIG"] = xds.bootstrap_json(node_id=f"{kind}-client")
        env.pop("GRPC_XDS_BOOTSTRAP", None)
        if kind == "grpcio":
            argv = [sys.executable, str(CLIENT), target]
        else:
            argv = ["node", str(NODE_DIR / "xds_client.js"), target]
        self.kind = kind
        self.process = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"the {self.kind} client exited ({self.process.poll()})"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        assert self.process.wait(10) == 0


@pytest.fixture
def client(request: pytest.FixtureRequest, xds: XdsServer) -> Iterator[XdsClient]:
    """grpcio's client, or the one named by ``@pytest.mark.parametrize("client", [...], indirect=True)``."""
    kind = getattr(request, "param", "grpcio")
    if kind == "grpc-js" and (
        shutil.which("node") is None or not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js-xds").is_dir()
    ):
        pytest.skip("grpc-js-xds needs node and `npm install` in tests/servers/node")
    started = XdsClient(xds, "xds:///echo", kind)
    yield started
    started.close()


def configure(xds: XdsServer, echo: dict[str, int], split: dict[str, int]) -> dict[str, str]:
    """``echo`` -> RDS ``echo-routes`` (``split`` over clusters a and b) -> EDS clusters; returns the versions."""
    return {
        LDS: xds.set(LDS, [r.listener("echo", rds="echo-routes")]),
        RDS: xds.set(RDS, [routes(split)]),
        CDS: xds.set(CDS, [r.cluster("a"), r.cluster("b")]),
        EDS: xds.set(
            EDS,
            [
                r.cluster_load_assignment("a", [r.locality([r.endpoint("127.0.0.1", echo["a0"])], zone="z1")]),
                r.cluster_load_assignment("b", [r.locality([r.endpoint("127.0.0.1", echo["b0"])], zone="z1")]),
            ],
        ),
    }


def routes(split: dict[str, int]) -> Any:
    return r.route_configuration(
        "echo-routes", [r.virtual_host("echo", ["echo"], [r.route(prefix="/", weighted_clusters=split)])]
    )


def test_weighted_split_80_20(xds: XdsServer, echo: dict[str, int], client: XdsClient) -> None:
    versions = configure(xds, echo, {"a": 80, "b": 20})
    counts = client.ask(calls=CALLS)["counts"]
    assert set(counts) == {"a0", "b0"}
    assert abs(counts["a0"] / CALLS - 0.80) < 0.05, counts
    for type_url, version in versions.items():
        ack = xds.wait_for_ack(type_url, version)
        assert ack.node_id == f"{client.kind}-client"
    assert not any(q.is_nack for q in xds.requests)
    assert xds.subscribed(LDS) == {"echo"}
    assert xds.subscribed(RDS) == {"echo-routes"}
    assert xds.subscribed(CDS) == {"a", "b"}
    assert xds.subscribed(EDS) == {"a", "b"}


@pytest.mark.parametrize("client", ["grpcio", "grpc-js"], indirect=True)
def test_pushed_split_moves_the_client(xds: XdsServer, echo: dict[str, int], client: XdsClient) -> None:
    versions = configure(xds, echo, {"a": 80, "b": 20})
    counts = client.ask(calls=CALLS)["counts"]
    assert abs(counts["a0"] / CALLS - 0.80) < 0.05, counts
    for type_url, acked in versions.items():
        assert xds.wait_for_ack(type_url, acked).node_id == f"{client.kind}-client"
    version = xds.set(RDS, [routes({"a": 0, "b": 100})])
    xds.wait_for_ack(RDS, version)
    # 40 answers in a row from b0 (0.2**40 under the old split): the new configuration is in use...
    assert "calls" in client.ask(until="b0", run=40, max=5000)
    # ...and from then on every call goes to b.
    assert client.ask(calls=300)["counts"] == {"b0": 300}


def test_locality_weights_and_a_new_endpoint(xds: XdsServer, echo: dict[str, int], client: XdsClient) -> None:
    """One cluster, localities weighted 3:1 (gRPC's weighted_target); then EDS adds an endpoint to the first."""
    xds.set(
        LDS,
        [
            r.listener(
                "echo",
                route_config=r.route_configuration("inline", [r.virtual_host("echo", ["*"], [r.route(cluster="b")])]),
            )
        ],
    )
    xds.set(CDS, [r.cluster("b")])
    xds.set(
        EDS,
        [
            r.cluster_load_assignment(
                "b",
                [
                    r.locality([r.endpoint("127.0.0.1", echo["b0"])], weight=3, zone="z1"),
                    r.locality([r.endpoint("127.0.0.1", echo["a0"])], weight=1, zone="z2"),
                ],
            )
        ],
    )
    counts = client.ask(calls=CALLS)["counts"]
    assert abs(counts["b0"] / CALLS - 0.75) < 0.05, counts
    assert acked_types(xds.requests) == {LDS, CDS, EDS}  # inline route configuration: no RDS
    assert xds.subscribed(RDS) == set()
    version = xds.set(
        EDS,
        [
            r.cluster_load_assignment(
                "b",
                [
                    r.locality(
                        [r.endpoint("127.0.0.1", echo["b0"]), r.endpoint("127.0.0.1", echo["b1"])], weight=3, zone="z1"
                    ),
                    r.locality([r.endpoint("127.0.0.1", echo["a0"])], weight=1, zone="z2"),
                ],
            )
        ],
    )
    xds.wait_for_ack(EDS, version)
    assert "calls" in client.ask(until="b1", run=1, max=5000)
    counts = client.ask(calls=CALLS)["counts"]
    assert abs(counts["b0"] / CALLS - 0.375) < 0.05, counts  # round robin inside the locality
    assert abs(counts["b1"] / CALLS - 0.375) < 0.05, counts


def test_invalid_resource_is_nacked_and_the_last_good_one_serves(
    xds: XdsServer, echo: dict[str, int], client: XdsClient
) -> None:
    good = configure(xds, echo, {"a": 0, "b": 100})
    assert client.ask(calls=50)["counts"] == {"b0": 50}
    xds.set_raw(RDS, "echo-routes", b"\xff\xff\xff")
    error = xds.wait_for_nack(RDS)
    assert error
    nack = next(q for q in xds.requests if q.is_nack)
    assert nack.version_info == good[RDS]  # a NACK carries the last version the client accepted
    assert client.ask(calls=50)["counts"] == {"b0": 50}
    fixed = xds.set(RDS, [routes({"a": 100, "b": 0})])
    xds.wait_for_ack(RDS, fixed)
    assert "calls" in client.ask(until="a0", run=1, max=5000)
    assert client.ask(calls=50)["counts"] == {"a0": 50}


def test_control_plane_restart(xds: XdsServer, echo: dict[str, int], client: XdsClient) -> None:
    configure(xds, echo, {"a": 0, "b": 100})
    assert client.ask(calls=20)["counts"] == {"b0": 20}
    xds.stop()
    assert client.ask(calls=20)["counts"] == {"b0": 20}  # fail-static while the control plane is away
    mark = xds.mark()
    xds.start()
    version = xds.set(RDS, [routes({"a": 100, "b": 0})])
    xds.wait_for_ack(RDS, version, after=mark)
    assert {q.stream for q in xds.requests[mark:]} == {2}  # the client came back on a new stream
    assert "calls" in client.ask(until="a0", run=1, max=5000)
    assert client.ask(calls=20)["counts"] == {"a0": 20}
