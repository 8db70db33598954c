"""grpcio's own xDS client, driven over stdin: ``python -m tests.servers.xds_grpc_client TARGET``.

gRPC C-core reads ``GRPC_XDS_BOOTSTRAP_CONFIG`` once per process, so each test runs this in a subprocess with the
bootstrap of its :class:`tests.servers.xds.XdsServer`. One channel to ``TARGET`` (``xds:///echo``) lives for the
whole process; each JSON line on stdin is a command, each answer one JSON line on stdout:

* ``{"calls": N}`` -> ``{"counts": {server name: calls it answered}}`` after N unary calls; optional
  ``"parallel": K`` keeps K calls in flight (futures; the same counts, sooner) and ``"metadata": [[key, value]]``
  is sent with every call;
* ``{"keys": [v1, v2...], "header": NAME}`` -> ``{"picks": {v: server name}}``: one call per value with the
  metadata ``NAME: v`` (a ring_hash header hash policy's key);
* ``{"until": NAME, "run": K, "max": M}`` -> ``{"calls": n}`` once K answers in a row came from NAME (at most M
  calls, else ``{"error": ...}``): the event "the client now follows the new configuration".

The method is ``/echo.Echo/Who`` with raw bytes both ways; the servers answer with their name.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import grpc

METHOD = "/echo.Echo/Who"


def main() -> int:
    target = sys.argv[1]
    channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(METHOD)
    for line in sys.stdin:
        command = json.loads(line)
        answer: dict[str, object]
        if "calls" in command:
            metadata = [tuple(pair) for pair in command.get("metadata", [])]
            answer = {"counts": dict(many(call, command["calls"], command.get("parallel", 1), metadata))}
        elif "keys" in command:
            header = command["header"]
            answer = {
                "picks": {
                    key: call(b"", timeout=10, wait_for_ready=True, metadata=[(header, key)]).decode()
                    for key in command["keys"]
                }
            }
        else:
            run = calls = 0
            while run < command["run"] and calls < command["max"]:
                calls += 1
                run = run + 1 if call(b"", timeout=10, wait_for_ready=True).decode() == command["until"] else 0
            answer = {"calls": calls} if run >= command["run"] else {"error": f"no run of {command['run']} in {calls}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    channel.close()
    return 0


def many(
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes], n: int, parallel: int, metadata: list[tuple[str, str]]
) -> Counter[str]:
    """``n`` calls, at most ``parallel`` in flight; which server answered each."""
    counts: Counter[str] = Counter()
    done = 0
    while done < n:
        batch = [
            call.future(b"", timeout=10, wait_for_ready=True, metadata=metadata) for _ in range(min(parallel, n - done))
        ]
        counts.update(future.result().decode() for future in batch)
        done += len(batch)
    return counts


if __name__ == "__main__":
    sys.exit(main())
