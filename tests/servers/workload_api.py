"""A SPIFFE Workload API server double on a Unix socket, for tests of SVIDs streamed from the Workload API.

Built from the same protocol definitions as the client: the ``workload_pb2``/``workload_pb2_grpc`` modules the
``spiffe`` package ships (generated from the SPIFFE project's ``workload.proto``), served by grpcio. What it
does, as the SPIFFE Workload API standard says a server must:

* every call must carry the metadata ``workload.spiffe.io: true``; without it the call fails with
  ``INVALID_ARGUMENT`` ("security header missing from request", SPIRE's wording) and nothing is sent;
* ``FetchX509SVID`` and ``FetchX509Bundles`` are server streams: the current material first, then a new
  message every time it changes (:meth:`WorkloadAPIServer.push`), to every open stream;
* no identity for the caller (``svids=()``) is ``PERMISSION_DENIED`` (SPIRE's answer before registration);
* SVIDs carry the DER certificate chain (leaf first), the PKCS#8 DER key and the trust domain's bundle
  (concatenated DER CA certificates); other trust domains' bundles go in ``federated_bundles`` keyed by
  ``spiffe://<trust domain>``.

:meth:`~WorkloadAPIServer.stop` ends every stream (``UNAVAILABLE``, as an agent going away does) and closes the
socket; :meth:`~WorkloadAPIServer.start` again serves on the same path (an agent restart). The JWT methods are
left to the generated servicer's ``UNIMPLEMENTED``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from spiffe._proto import workload_pb2, workload_pb2_grpc

from tests.security.pki import CA, Leaf

HEADER = ("workload.spiffe.io", "true")


@dataclass(frozen=True)
class SVID:
    """One X.509-SVID as the server hands it out: SPIFFE ID, certificate chain and key, its trust domain's CAs."""

    spiffe_id: str
    leaf: Leaf
    bundle: tuple[CA, ...]
    hint: str = ""

    def message(self) -> Any:
        chain_der = b"".join(cert.public_bytes(serialization.Encoding.DER) for cert in _chain(self.leaf.chain_pem))
        key_der = self.leaf.key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return workload_pb2.X509SVID(
            spiffe_id=self.spiffe_id,
            x509_svid=chain_der,
            x509_svid_key=key_der,
            bundle=bundle_der(self.bundle),
            hint=self.hint,
        )


def _chain(pem: bytes) -> list[Any]:
    from cryptography import x509

    return x509.load_pem_x509_certificates(pem)


def bundle_der(cas: Sequence[CA]) -> bytes:
    """A trust bundle on the wire: the CA certificates' DER encodings, concatenated."""
    return b"".join(ca.cert.public_bytes(serialization.Encoding.DER) for ca in cas)


class _State:
    """The material served now and a version number; streams wait on the condition for a newer version."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.version = 0
        self.svids: tuple[SVID, ...] = ()
        self.federated: dict[str, tuple[CA, ...]] = {}
        self.stopping = False
        self.streams = 0
        self.refused = 0


class _Servicer(workload_pb2_grpc.SpiffeWorkloadAPIServicer):  # type: ignore[misc]
    def __init__(self, state: _State) -> None:
        self._state = state

    def _check_header(self, context: grpc.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata())
        if metadata.get(HEADER[0]) != HEADER[1]:
            with self._state.changed:
                self._state.refused += 1
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")

    def _stream(self, context: grpc.ServicerContext, build: Any) -> Iterator[Any]:
        self._check_header(context)
        state = self._state
        context.add_callback(lambda: _wake(state))
        seen = -1
        with state.changed:
            state.streams += 1
            state.changed.notify_all()
        try:
            while True:
                with state.changed:
                    state.changed.wait_for(
                        lambda last=seen: state.stopping or state.version != last or not context.is_active()  # type: ignore[misc]
                    )
                    if not context.is_active():
                        return
                    if state.stopping:
                        context.abort(grpc.StatusCode.UNAVAILABLE, "the Workload API server is stopping")
                    seen = state.version
                    svids, federated = state.svids, dict(state.federated)
                if not svids:
                    context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
                yield build(svids, federated)
        finally:
            with state.changed:
                state.streams -= 1
                state.changed.notify_all()

    def FetchX509SVID(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        def build(svids: tuple[SVID, ...], federated: Mapping[str, tuple[CA, ...]]) -> Any:
            return workload_pb2.X509SVIDResponse(
                svids=[svid.message() for svid in svids],
                federated_bundles={td: bundle_der(cas) for td, cas in federated.items()},
            )

        return self._stream(context, build)

    def FetchX509Bundles(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        def build(svids: tuple[SVID, ...], federated: Mapping[str, tuple[CA, ...]]) -> Any:
            bundles = {td: bundle_der(cas) for td, cas in federated.items()}
            for svid in svids:
                bundles[_trust_domain(svid.spiffe_id)] = bundle_der(svid.bundle)
            return workload_pb2.X509BundlesResponse(bundles=bundles)

        return self._stream(context, build)


def _wake(state: _State) -> None:
    with state.changed:
        state.changed.notify_all()


def _trust_domain(spiffe_id: str) -> str:
    """``spiffe://td/path`` -> ``spiffe://td`` (the key the Workload API uses for bundles)."""
    return "spiffe://" + spiffe_id.removeprefix("spiffe://").split("/", 1)[0]


class WorkloadAPIServer:
    """A Workload API server on the Unix socket ``path``; ``endpoint`` is the ``SPIFFE_ENDPOINT_SOCKET`` value."""

    def __init__(
        self, path: Path, svids: Sequence[SVID] = (), federated: Mapping[str, Sequence[CA]] | None = None
    ) -> None:
        self.path = path
        self._state = _State()
        self._state.svids = tuple(svids)
        self._state.federated = {td: tuple(cas) for td, cas in (federated or {}).items()}
        self._server: grpc.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"unix://{self.path}"

    @property
    def refused(self) -> int:
        """Calls refused for a missing ``workload.spiffe.io`` header."""
        return self._state.refused

    def start(self) -> WorkloadAPIServer:
        if self.path.exists():
            os.unlink(self.path)  # a stale socket from a previous run (an agent restart does the same)
        with self._state.changed:
            self._state.stopping = False
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="workload-api"))
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(_Servicer(self._state), server)
        server.add_insecure_port(f"unix:{self.path}")
        server.start()
        self._server = server
        return self

    def push(self, svids: Sequence[SVID] | None = None, federated: Mapping[str, Sequence[CA]] | None = None) -> None:
        """Replace the SVIDs (and/or federated bundles) and send the new material on every open stream."""
        with self._state.changed:
            if svids is not None:
                self._state.svids = tuple(svids)
            if federated is not None:
                self._state.federated = {td: tuple(cas) for td, cas in federated.items()}
            self._state.version += 1
            self._state.changed.notify_all()

    def wait_for_streams(self, count: int, timeout: float = 10.0) -> bool:
        """Block until ``count`` streams are open (``False`` if ``timeout`` ran out)."""
        with self._state.changed:
            return self._state.changed.wait_for(lambda: self._state.streams >= count, timeout)

    def wait_for_streams_at_most(self, count: int, timeout: float = 10.0) -> bool:
        """Block until at most ``count`` streams are open (``False`` if ``timeout`` ran out)."""
        with self._state.changed:
            return self._state.changed.wait_for(lambda: self._state.streams <= count, timeout)

    def stop(self) -> None:
        """End every stream and stop serving (the socket file goes)."""
        with self._state.changed:
            self._state.stopping = True
            self._state.changed.notify_all()
        if self._server is not None:
            self._server.stop(grace=None).wait(10)
            self._server = None
        if self.path.exists():
            os.unlink(self.path)

    def __enter__(self) -> WorkloadAPIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
