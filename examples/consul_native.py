"""Consul Connect Native: two callers of one service, identities and an intention from Consul, no sidecar.

    .venv/bin/python examples/consul_native.py     # needs uvicorn (in meshlib's dev extra)

Everything runs in one process on loopback. The local Consul agent is played by ``tests.servers.consul.ConsulEmulator``,
the double meshlib's tests use: it follows Consul's documented HTTP API (catalog and health, the discovery chain,
the Connect CA's leaf and roots, intentions). With a real agent only ``CONSUL_HTTP_ADDR`` changes (and
``CONSUL_HTTP_TOKEN`` when ACLs are on); the services would be registered and the intentions written with the
``consul`` CLI or Terraform instead of ``consul.register`` and ``consul.set_intentions``.

* ``payments`` is an ASGI app on uvicorn over mutual TLS with its Consul leaf certificate
  (``meshlib.security.consul_ca.ConsulCASource("payments")``, rotated as Consul rotates it), registered as a
  Connect Native service, behind ``meshlib.server.MeshMiddleware`` whose ``mesh_hooks`` enforce Consul
  intentions because ``MESHLIB_CONSUL_SERVICE=payments`` is set. Its intentions: ``billing`` allow, ``*`` deny.
* ``billing`` calls it with ``meshlib.Client`` configured as a deployment would be::

      CONSUL_HTTP_ADDR=127.0.0.1:8500 MESHLIB_CONSUL_SERVICE=billing
      MESHLIB_SERVICE_PAYMENTS=consul+chain://payments

  The discovery chain (Consul's default chain: payments has no config entries) routes ``http://payments/charge``
  to the instances ``/v1/health/connect/payments`` lists; the call goes over mTLS with billing's leaf (``http://``
  is upgraded: a Connect upstream is never called in plaintext), and payments is checked against its own SPIFFE
  ID. payments sees ``spiffe://<trust domain>/ns/default/dc/dc1/svc/billing`` and answers 200.
* ``reporting`` does the same with ``MESHLIB_CONSUL_SERVICE=reporting``: 403 ``RBAC: access denied``, and the
  handler never runs for it.
* then the operator adds a ``service-resolver`` with failover to ``payments-dr`` (a second Connect Native service
  with its own leaf and intentions), and ``payments-1``'s health check goes critical: billing's calls move to
  ``payments-dr``, checked against payments-dr's identity, without a failed request.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project root: tests.servers (the Consul double)

import meshlib
from meshlib.security.consul_ca import ConsulCASource
from meshlib.server import MeshMiddleware, peer_identity
from meshlib.server.middleware import mesh_hooks
from tests.servers import consul_chains as chains
from tests.servers.consul import ConsulEmulator, running

#: How many calls billing makes at most while waiting for the failover to show (each a real request: the
#: health watch's answer lands between two of them).
FAILOVER_CALLS = 2000


@dataclass
class Outcome:
    """What the run saw, for printing and for tests."""

    lines: list[str] = field(default_factory=list)
    handled: list[str] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    answered_by: dict[str, str] = field(default_factory=dict)
    failed_during_failover: int = 0

    def say(self, line: str) -> None:
        self.lines.append(line)
        print(line)


def payments_app(instance: str, handled: list[str]) -> Any:
    """The service's own code: it only runs for callers the intentions allow, and says who called."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        caller = peer_identity()
        handled.append(f"{instance}: {scope['method']} {scope['path']} from {caller}")
        body = f"{instance} saw {caller}".encode()
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


class Service:
    """One Connect Native instance: ``app`` behind ``MeshMiddleware`` (intentions of ``service``) on uvicorn over
    mTLS with ``service``'s Consul leaf, registered in Consul as ``instance``."""

    def __init__(self, consul: ConsulEmulator, service: str, instance: str, handled: list[str]) -> None:
        import uvicorn

        from meshlib.server.uvicorn import H11Protocol

        agent = {"CONSUL_HTTP_ADDR": consul.address}
        self.source = ConsulCASource(service, environ=agent)  # blocks until the leaf and the roots are in hand
        hooks = mesh_hooks(environ={**agent, "MESHLIB_CONSUL_SERVICE": service})  # + ConsulIntentionsHook
        self.app = MeshMiddleware(payments_app(instance, handled), hooks=list(hooks))

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
            self.app,
            http=H11Protocol,  # gives the middleware the verified client certificate
            log_level="warning",
            # The leaf as it is now, for each new connection: a rotated leaf is served without a restart.
            ssl_context_factory=lambda config, default: self.source.server_context(),
        )
        self.server = Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        self.server.ready.wait(30)
        self.port = sock.getsockname()[1]
        consul.register(service, self.port, id=instance, address="127.0.0.1", connect_native=True)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.app.close()  # the intentions watch
        self.source.close()  # the leaf and roots watches


def run(consul: ConsulEmulator) -> Outcome:
    """Serve payments (and payments-dr) with Consul identities and intentions; call them as billing and reporting."""
    outcome = Outcome()
    for service in ("payments", "payments-dr"):
        consul.set_intentions(service, [{"Name": "billing", "Action": "allow"}, {"Name": "*", "Action": "deny"}])
    services = [
        Service(consul, "payments", "payments-1", outcome.handled),
        Service(consul, "payments-dr", "payments-dr-1", outcome.handled),
    ]

    def client(caller: str) -> meshlib.Client:
        return meshlib.Client(
            environ={
                "CONSUL_HTTP_ADDR": consul.address,
                "MESHLIB_CONSUL_SERVICE": caller,  # this workload's Consul identity: its leaf, for Connect mTLS
                "MESHLIB_SERVICE_PAYMENTS": "consul+chain://payments",
                "MESHLIB_RETRIES": "0",  # every outcome below is the first attempt's
            }
        )

    # Every client stays open until the end: the Consul double answers a blocking query whose caller has gone
    # with a write to a closed socket (a traceback on stderr) if the index moves before it stops.
    try:
        with client("billing") as billing, client("reporting") as reporting:
            allowed = billing.get("http://payments/charge")
            outcome.statuses["billing"] = allowed.status_code
            outcome.answered_by["billing"] = allowed.text.split(" saw ")[0]
            outcome.say(f"billing   GET /charge -> {allowed.status_code} ({allowed.text})")
            denied = reporting.get("http://payments/charge")
            outcome.statuses["reporting"] = denied.status_code
            outcome.say(f"reporting GET /charge -> {denied.status_code} {denied.text.strip()}")

            # The operator writes a service-resolver for payments: fail over to payments-dr. A new billing client
            # (say, after a deploy) reads that chain; then payments-1's health check goes critical.
            consul.set_chain("payments", chains.failover("payments", ["payments-dr"]))
            with client("billing") as redeployed:
                first = redeployed.get("http://payments/charge")
                outcome.say(f"with failover to payments-dr: billing GET /charge -> {first.status_code} ({first.text})")
                consul.set_status("payments-1", "critical")
                outcome.say("payments-1's health check: critical")
                made, moved = 0, first
                while not moved.text.startswith("payments-dr-1 ") and made < FAILOVER_CALLS:
                    moved = redeployed.get("http://payments/charge")
                    made += 1
                    if moved.status_code != 200:
                        outcome.failed_during_failover += 1
                outcome.statuses["failover"] = moved.status_code
                outcome.answered_by["failover"] = moved.text.split(" saw ")[0]
                outcome.say(
                    f"billing   GET /charge -> {moved.status_code} ({moved.text}); "
                    f"call {made} after the check failed, {outcome.failed_during_failover} failed"
                )
    finally:
        for service in services:
            service.close()

    outcome.say(f"the handlers ran {len(outcome.handled)} times; the callers they saw:")
    callers = sorted({line.split(": ", 1)[0] + " <- " + line.rsplit(" from ", 1)[1] for line in outcome.handled})
    for line in callers:
        outcome.say(f"  {line}")
    return outcome


def main(argv: Sequence[str] | None = None) -> int:
    """Run the example against a fresh Consul double; exit code 0 when every outcome is the expected one."""
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    with running() as consul:
        outcome = run(consul)
        billing = consul.spiffe_id("billing")
    expected = (
        outcome.statuses == {"billing": 200, "reporting": 403, "failover": 200}
        and outcome.answered_by == {"billing": "payments-1", "failover": "payments-dr-1"}
        and outcome.failed_during_failover == 0
        and bool(outcome.handled)
        and all(line.endswith(f" from {billing}") for line in outcome.handled)
    )
    print("consul native: OK" if expected else "consul native: UNEXPECTED OUTCOME")
    return 0 if expected else 1


if __name__ == "__main__":
    sys.exit(main())
