"""Zero trust on the inbound half: one service, two callers over mTLS; one allowed, one denied, one rate-limited.

    .venv/bin/python examples/zero_trust.py        # needs uvicorn (in meshlib's dev extra)

The ``orders`` service is an ASGI app behind ``meshlib.server.MeshMiddleware`` on uvicorn, over mutual TLS
(uvicorn run with ``meshlib.server.uvicorn.H11Protocol``, so the middleware sees the verified client
certificate). Its operator wrote two files, named as a deployment would name them::

    MESHLIB_AUTHZ_FILE=authz.yaml          # Istio AuthorizationPolicy: only checkout may call, and not /admin
    MESHLIB_RATELIMIT_FILE=ratelimit.yaml  # Linkerd HTTPLocalRateLimitPolicy: 3 requests/s per caller

Two workloads call it with ``meshlib.Client``, each presenting its own X.509-SVID from a throw-away CA (the
same PKI as ``examples/mtls.py``):

* ``checkout`` (``spiffe://example.org/ns/shop/sa/checkout``) is **allowed**: its request reaches the handler;
  ``GET /admin/stats`` is **denied** by the DENY policy even for checkout;
* ``reporting`` (``spiffe://example.org/ns/shop/sa/reporting``) is **denied**: 403 ``RBAC: access denied``,
  and the handler never runs;
* then checkout sends 8 requests at once with retries off: what is left of its burst (3 requests, one already
  spent) passes, the rest are **rate-limited** (429 with ``Retry-After``); reporting's denials spent none of that
  budget; and the same call inside ``meshlib.policy(retries=2)`` gets a 429, waits as ``Retry-After`` says, and
  succeeds.

The script prints each outcome, what the handler saw, and the server's decision counters
(``meshlib.server.authz``, ``meshlib.server.rate_limited``, read with the OpenTelemetry SDK's in-memory reader).
"""

from __future__ import annotations

import argparse
import importlib.util
import socket
import ssl
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import meshlib
from meshlib.server import MeshMiddleware, peer_identity

TRUST_DOMAIN = "spiffe://example.org"
ORDERS_ID = f"{TRUST_DOMAIN}/ns/shop/sa/orders"
CHECKOUT_ID = f"{TRUST_DOMAIN}/ns/shop/sa/checkout"
REPORTING_ID = f"{TRUST_DOMAIN}/ns/shop/sa/reporting"

AUTHZ = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: orders-callers, namespace: shop}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: ["example.org/ns/shop/sa/checkout"]}}]
    to: [{operation: {methods: ["GET", "POST"], paths: ["/orders", "/orders/*", "/admin/*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin/*"]}}]
"""

RATE_LIMIT = """\
apiVersion: policy.linkerd.io/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {name: orders, namespace: shop}
spec:
  targetRef: {group: policy.linkerd.io, kind: Server, name: orders-https}
  total: {requestsPerSecond: 100}
  identity: {requestsPerSecond: 3}
"""


def _pki() -> Any:
    """``examples/mtls.py``'s throw-away CA (loaded by path: examples/ is a folder of scripts)."""
    spec = importlib.util.spec_from_file_location("example_mtls_pki", Path(__file__).with_name("mtls.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class Outcome:
    """What the run saw, for printing and for tests."""

    lines: list[str] = field(default_factory=list)
    handled: list[str] = field(default_factory=list)
    statuses: dict[str, list[int]] = field(default_factory=dict)
    retry_after: list[str] = field(default_factory=list)
    backed_off_attempts: int = 0
    counters: dict[str, int] = field(default_factory=dict)

    def say(self, line: str) -> None:
        self.lines.append(line)
        print(line)


def orders_app(handled: list[str]) -> Any:
    """The service's own code: it only runs for requests the policies let through."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        handled.append(f"{scope['method']} {scope['path']} from {peer_identity()}")
        body = b'{"order": 42}'
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def serve(app: Any, context_files: Any, ca_file: Path) -> tuple[Any, threading.Thread, int]:
    """uvicorn on a loopback port over mTLS (client certificate required), with meshlib's TLS-extension protocol."""
    import uvicorn

    from meshlib.server.uvicorn import H11Protocol

    class Server(uvicorn.Server):
        ready = threading.Event()

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            try:
                await super().startup(sockets)
            finally:
                self.ready.set()

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app,
        http=H11Protocol,
        log_level="warning",
        ssl_certfile=str(context_files.cert),
        ssl_keyfile=str(context_files.key),
        ssl_ca_certs=str(ca_file),
        ssl_cert_reqs=ssl.CERT_REQUIRED,
    )
    server = Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    server.ready.wait(30)
    return server, thread, sock.getsockname()[1]


def run(directory: Path) -> Outcome:
    """Make the PKI and the policy files in ``directory``, serve orders, and call it as both workloads."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    pki = _pki()
    authority = pki.CertificateAuthority(TRUST_DOMAIN)
    ca_file = authority.write(directory / "ca.pem")
    orders = authority.issue(ORDERS_ID, directory, "orders")
    checkout = authority.issue(CHECKOUT_ID, directory, "checkout")
    reporting = authority.issue(REPORTING_ID, directory, "reporting")
    (directory / "authz.yaml").write_text(AUTHZ)
    (directory / "ratelimit.yaml").write_text(RATE_LIMIT)

    outcome = Outcome()
    reader = InMemoryMetricReader()
    server_environ = {
        "MESHLIB_AUTHZ_FILE": str(directory / "authz.yaml"),
        "MESHLIB_RATELIMIT_FILE": str(directory / "ratelimit.yaml"),
    }
    app = MeshMiddleware(
        orders_app(outcome.handled), meter_provider=MeterProvider(metric_readers=[reader]), environ=server_environ
    )
    server, thread, port = serve(app, orders, ca_file)
    try:

        def client(files: Any) -> meshlib.Client:
            return meshlib.Client(
                environ={
                    "MESHLIB_SERVICE_ORDERS": f"static://127.0.0.1:{port}",
                    "MESHLIB_SERVICE_ORDERS__TLS_SERVER_ID": ORDERS_ID,
                    "MESHLIB_TLS_CA_FILE": str(ca_file),
                    "MESHLIB_TLS_CERT_FILE": str(files.cert),
                    "MESHLIB_TLS_KEY_FILE": str(files.key),
                    "MESHLIB_RETRIES": "0",
                }
            )

        with client(checkout) as as_checkout, client(reporting) as as_reporting:
            allowed = as_checkout.get("https://orders/orders/42")
            outcome.say(f"checkout  GET /orders/42     -> {allowed.status_code} {allowed.text}")
            admin = as_checkout.get("https://orders/admin/stats")
            outcome.say(f"checkout  GET /admin/stats   -> {admin.status_code} {admin.text.strip()}")
            denied = [as_reporting.get("https://orders/orders/42") for _ in range(3)]
            outcome.say(f"reporting GET /orders/42 x3  -> {[r.status_code for r in denied]} {denied[0].text.strip()}")
            burst = [as_checkout.get("https://orders/orders") for _ in range(8)]
            outcome.statuses = {
                "allowed": [allowed.status_code],
                "admin": [admin.status_code],
                "denied": [r.status_code for r in denied],
                "burst": [r.status_code for r in burst],
            }
            outcome.retry_after = [r.headers["retry-after"] for r in burst if r.status_code == 429]
            outcome.say(
                f"checkout  GET /orders x8     -> {[r.status_code for r in burst]} "
                f"(429s say Retry-After: {', '.join(outcome.retry_after)})"
            )
            with meshlib.policy(retries=2):  # code narrows the environment's "no retries" for this call
                answer = as_checkout.get("https://orders/orders")
            outcome.backed_off_attempts = int(answer.extensions["meshlib.attempts"])
            outcome.statuses["patient"] = [answer.status_code]
            outcome.say(
                f"checkout  GET /orders, retries=2 -> {answer.status_code} after "
                f"{outcome.backed_off_attempts} attempts (waited as Retry-After said)"
            )
    finally:
        server.should_exit = True
        thread.join(30)
        app.close()  # stop watching the policy files before the directory goes

    outcome.say(f"the handler ran {len(outcome.handled)} times:")
    for line in outcome.handled[:3]:
        outcome.say(f"  {line}")
    if len(outcome.handled) > 3:
        outcome.say(f"  ... ({len(outcome.handled) - 3} more, all from checkout)")
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data is not None else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name in ("meshlib.server.authz", "meshlib.server.rate_limited"):
                    for point in metric.data.data_points:
                        labels = ",".join(f"{k}={v}" for k, v in sorted(point.attributes.items()))
                        outcome.counters[f"{metric.name}{{{labels}}}"] = int(point.value)
    outcome.say("server counters:")
    for name, value in sorted(outcome.counters.items()):
        outcome.say(f"  {name} {value}")
    return outcome


def main(argv: Sequence[str] | None = None) -> int:
    """Run the example in a temporary directory; exit code 0 when every outcome is the expected one."""
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        outcome = run(Path(directory))
    expected = (
        outcome.statuses["allowed"] == [200]
        and outcome.statuses["admin"] == [403]
        and outcome.statuses["denied"] == [403, 403, 403]
        and 429 in outcome.statuses["burst"]
        and outcome.statuses["patient"] == [200]
        and all(line.endswith(CHECKOUT_ID) for line in outcome.handled)
    )
    print("zero trust inbound: OK" if expected else "zero trust inbound: UNEXPECTED OUTCOME")
    return 0 if expected else 1


if __name__ == "__main__":
    sys.exit(main())
