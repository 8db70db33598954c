"""The Workload API double checked against an independent client: the ``spiffe`` package's own.

If the double and the ``spiffe`` package's client agree on the protocol (messages, header, streaming,
reconnection), tests of meshlib's Workload API source against the double mean something.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

pytest.importorskip("spiffe")
import grpc
from spiffe import WorkloadApiClient, X509Source
from spiffe._proto import workload_pb2, workload_pb2_grpc
from spiffe.spiffe_id.spiffe_id import TrustDomain

from tests.security.pki import CA
from tests.servers.workload_api import SVID, WorkloadAPIServer

pytestmark = [pytest.mark.timeout(30), pytest.mark.one_library]

ID = "spiffe://example.org/ns/default/sa/api"


def svid(ca: CA, spiffe_id: str = ID) -> SVID:
    return SVID(spiffe_id, ca.issue(uris=(spiffe_id,)), (ca,))


def test_x509_source_gets_svid_and_bundle(socket_dir: Path, ca: CA) -> None:
    other = CA("partner CA", trust_domain="partner.example")
    first = svid(ca)
    with (
        WorkloadAPIServer(socket_dir / "agent.sock", [first], {"spiffe://partner.example": [other]}) as server,
        X509Source(socket_path=server.endpoint, timeout_in_seconds=10) as source,
    ):
        context = source.get_x509_context()
        got = context.default_svid
        assert str(got.spiffe_id) == ID
        assert got.leaf == first.leaf.cert
        assert got.cert_chain == [first.leaf.cert]
        assert got.private_key.private_numbers() == first.leaf.key.private_numbers()  # type: ignore[union-attr]
        own = source.get_bundle_for_trust_domain(TrustDomain("example.org"))
        partner = source.get_bundle_for_trust_domain(TrustDomain("partner.example"))
        assert own is not None and own.x509_authorities == {ca.cert}
        assert partner is not None and partner.x509_authorities == {other.cert}


def test_x509_source_sees_rotation(socket_dir: Path, ca: CA) -> None:
    first, second = svid(ca), svid(ca)
    with (
        WorkloadAPIServer(socket_dir / "agent.sock", [first]) as server,
        X509Source(socket_path=server.endpoint, timeout_in_seconds=10) as source,
    ):
        updated = threading.Event()
        source.subscribe_for_updates(updated.set)
        assert source.get_x509_context().default_svid.leaf == first.leaf.cert
        server.push([second])
        assert updated.wait(10)
        assert source.get_x509_context().default_svid.leaf == second.leaf.cert


def test_fetch_x509_bundles_and_one_shot_fetch(socket_dir: Path, ca: CA) -> None:
    with (
        WorkloadAPIServer(socket_dir / "agent.sock", [svid(ca)]) as server,
        WorkloadApiClient(server.endpoint) as client,
    ):
        bundles = client.fetch_x509_bundles(timeout=10)
        bundle = bundles.get_bundle_for_trust_domain(TrustDomain("example.org"))
        assert bundle is not None and bundle.x509_authorities == {ca.cert}
        assert str(client.fetch_x509_svid(timeout=10).spiffe_id) == ID


def test_call_without_the_security_header_is_refused(socket_dir: Path, ca: CA) -> None:
    with WorkloadAPIServer(socket_dir / "agent.sock", [svid(ca)]) as server:
        with grpc.insecure_channel(f"unix:{server.path}") as channel:
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
            for call in (stub.FetchX509SVID, stub.FetchX509Bundles):
                with pytest.raises(grpc.RpcError) as caught:
                    next(call(workload_pb2.X509SVIDRequest(), timeout=10))
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "security header" in (caught.value.details() or "")
            # ... and with it, the same call is answered.
            reply = next(
                stub.FetchX509SVID(
                    workload_pb2.X509SVIDRequest(), timeout=10, metadata=[("workload.spiffe.io", "true")]
                )
            )
            assert reply.svids[0].spiffe_id == ID
        assert server.refused == 2


def test_no_identity_is_permission_denied(socket_dir: Path) -> None:
    with (
        WorkloadAPIServer(socket_dir / "agent.sock", []) as server,
        WorkloadApiClient(server.endpoint) as client,
        pytest.raises(Exception, match="PERMISSION_DENIED"),
    ):
        client.fetch_x509_svid(timeout=10)


def test_x509_source_reconnects_after_a_server_restart(socket_dir: Path, ca: CA) -> None:
    first, second = svid(ca), svid(ca)
    server = WorkloadAPIServer(socket_dir / "agent.sock", [first]).start()
    try:
        with X509Source(socket_path=server.endpoint, timeout_in_seconds=10) as source:
            updated = threading.Event()
            source.subscribe_for_updates(updated.set)
            server.stop()
            server.push([second])
            server.start()
            assert updated.wait(20)  # the client's retry (backoff from 0.1 s) found the restarted server
            assert source.get_x509_context().default_svid.leaf == second.leaf.cert
    finally:
        server.stop()
