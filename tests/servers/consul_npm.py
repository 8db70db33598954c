"""HashiCorp's own Consul API double (npm ``@hashicorp/consul-api-double``) as a subprocess, for contract tests.

Independent of meshlib's emulator (``tests/servers/consul.py``): HashiCorp's UI team publishes templated
fixtures of Consul's HTTP API (``v1/health/service/_``, ``v1/discovery-chain/_``, ``v1/agent/connect/...``),
served by ``@hashicorp/api-double`` (Express). ``tests/servers/consul_npm/serve.js`` serves them with the same
middleware chain as api-double's own ``bin/index.js`` but on ``127.0.0.1`` (the bin listens on every
interface) and on port 0, and prints ``READY <host> <port>``; this module starts it, reads that line (no
polling, a bounded deadline), drains its request log (``GET: /v1/...`` lines) and stops it.

Determinism (see docs/consul-npm-double.md): the templates draw from faker, re-seeded with ``seed`` before
every request, *and* from ``Math.random()`` for the number of items (nodes, tags, routes, resolvers...). So an
answer is byte-for-byte repeatable only when every count it uses is fixed by a ``CONSUL_*`` knob: pass
them as ``knobs`` (process environment of the server) or per request as cookies (a cookie wins). Headers do
not work as knobs (api-double looks up ``X-<KEY>`` but Express lower-cases header names).

Install with ``npm install`` in ``tests/servers/consul_npm`` (``./dev.sh test`` does it when npm exists);
:func:`missing` says why the double cannot run, for ``pytest.skip``.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import shutil
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "CHAIN_KNOBS",
    "FIXTURES",
    "HEALTH_KNOBS",
    "PACKAGE_DIR",
    "RECORD_SEED",
    "ConsulNpmDouble",
    "Response",
    "missing",
    "record",
]

PACKAGE_DIR = Path(__file__).resolve().parent / "consul_npm"
_PACKAGES = ("@hashicorp/api-double", "@hashicorp/consul-api-double", "express", "faker")
_STARTUP_TIMEOUT = 30.0
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "consul" / "npm"

#: The recorded answers' settings: faker's seed, and every count the health template draws from
#: ``Math.random()`` fixed (no checks, so every instance is passing; blocking queries answer at once).
RECORD_SEED = 7
HEALTH_KNOBS = {"CONSUL_NODE_COUNT": "3", "CONSUL_TAG_COUNT": "2", "CONSUL_CHECK_COUNT": "0", "CONSUL_LATENCY": "0"}
#: Every count the discovery-chain template draws from ``Math.random()``, fixed (sent as cookies).
CHAIN_KNOBS = {
    "CONSUL_ROUTE_COUNT": "3",
    "CONSUL_HEADER_COUNT": "1",
    "CONSUL_QUERYPARAM_COUNT": "1",
    "CONSUL_RESOLVER_COUNT": "2",
    "CONSUL_REDIRECT_COUNT": "1",
    "CONSUL_SUBSET_COUNT": "1",
    "CONSUL_SPLITTER_COUNT": "1",
    "CONSUL_SPLIT_COUNT": "2",
    "CONSUL_FAILOVER_COUNT": "1",
}
#: file name -> (path, cookies, method, body): what :func:`record` saves.
RECORDED: dict[str, tuple[str, Mapping[str, str], str, Mapping[str, Any] | None]] = {
    "health_service_web.json": ("/v1/health/service/web?passing=true", {}, "GET", None),
    "discovery_chain_web.json": ("/v1/discovery-chain/web?dc=dc1", CHAIN_KNOBS, "GET", None),
    "discovery_chain_virtual-admin-4.json": ("/v1/discovery-chain/virtual-admin-4", {}, "GET", None),
    "agent_connect_ca_leaf_web.json": ("/v1/agent/connect/ca/leaf/web", {}, "GET", None),
    "agent_connect_ca_roots.json": ("/v1/agent/connect/ca/roots", {}, "GET", None),
    "agent_connect_authorize.json": (
        "/v1/agent/connect/authorize",
        {},
        "POST",
        {
            "Target": "db",
            "ClientCertURI": "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/web",
        },
    ),
}


def missing() -> str | None:
    """Why the double cannot run here (no ``node``, or ``npm install`` not done), else ``None``."""
    if shutil.which("node") is None:
        return "node is not installed"
    for package in _PACKAGES:
        if not (PACKAGE_DIR / "node_modules" / package / "package.json").is_file():
            return f"{package} is not installed: run `npm install` in {PACKAGE_DIR}"
    return None


@dataclass(frozen=True)
class Response:
    """One answer of the double: status, headers (lower-case names), raw body."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class ConsulNpmDouble:
    """The npm Consul double on a free loopback port; a context manager (``start`` / ``stop``).

    ``seed`` is faker's seed (api-double's ``--seed``); ``knobs`` are ``CONSUL_*`` template variables
    (``CONSUL_NODE_COUNT``, ``CONSUL_CHECK_COUNT``, ``CONSUL_LATENCY``...) put in the server's environment,
    which otherwise holds only ``PATH``, so nothing from the developer's shell (a ``CONSUL_*`` variable)
    changes what it serves.
    """

    def __init__(self, *, seed: int = 1, knobs: Mapping[str, str] | None = None) -> None:
        for name in knobs or {}:
            if not name.startswith("CONSUL_"):
                raise ValueError(f"knobs: expected CONSUL_* template variables, got {name!r}")
        self.seed = seed
        self.knobs = dict(knobs or {})
        self.port = 0
        self._process: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._log: list[str] = []
        self._stderr: list[str] = []
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []

    # -- lifecycle

    def start(self) -> ConsulNpmDouble:
        """Start the server and wait for its ready line (at most 30 s, else :class:`RuntimeError`)."""
        reason = missing()
        if reason is not None:
            raise RuntimeError(f"the npm Consul double cannot run: {reason}")
        node = shutil.which("node")
        assert node is not None
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **self.knobs}
        self._process = subprocess.Popen(
            [node, str(PACKAGE_DIR / "serve.js"), "--seed", str(self.seed)],
            cwd=PACKAGE_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None and self._process.stderr is not None
        self._threads = [
            threading.Thread(target=self._read_stdout, args=(self._process.stdout,), daemon=True),
            threading.Thread(target=self._read_stderr, args=(self._process.stderr,), daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        try:
            line = self._lines.get(timeout=_STARTUP_TIMEOUT)
        except queue.Empty:
            line = None
        if line is None or not line.startswith("READY "):
            self.stop()
            raise RuntimeError(
                f"the npm Consul double did not start (first line {line!r}); stderr: {''.join(self._stderr)[-500:]!r}"
            )
        _, host, port = line.split()
        assert host == "127.0.0.1", host
        self.port = int(port)
        return self

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 5 s) and join the log readers. Idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> ConsulNpmDouble:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- where and what

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``, for ``CONSUL_HTTP_ADDR``."""
        return f"127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[str]:
        """Requests the server logged, in order, as ``METHOD: /path?query`` (api-double's own log line)."""
        with self._cond:
            return list(self._log)

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> list[str]:
        """Block until at least ``count`` requests were logged (``TimeoutError`` after ``timeout``)."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._log) >= count, timeout=timeout):
                raise TimeoutError(f"{len(self._log)} requests logged, expected {count}: {self._log}")
            return list(self._log)

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        cookies: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> Response:
        """One HTTP request to the double (``cookies`` are per-request ``CONSUL_*`` knobs)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        headers = {}
        if cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        payload = None if body is None else json.dumps(body).encode()
        try:
            connection.request(method, path, body=payload, headers=headers)
            reply = connection.getresponse()
            data = reply.read()
            return Response(reply.status, {k.lower(): v for k, v in reply.getheaders()}, data)
        finally:
            connection.close()

    def get(self, path: str, **kwargs: Any) -> Response:
        return self.request("GET", path, **kwargs)

    # -- internals

    def _read_stdout(self, stream: Any) -> None:
        ready = False
        for raw in stream:
            line = raw.rstrip("\n")
            if not ready:
                ready = True
                self._lines.put(line)
                continue
            with self._cond:
                self._log.append(line)
                self._cond.notify_all()
        if not ready:
            self._lines.put(None)  # exited before its ready line

    def _read_stderr(self, stream: Any) -> None:
        for raw in stream:
            with self._cond:
                self._stderr.append(raw)


def record(directory: Path = FIXTURES) -> list[Path]:
    """Save :data:`RECORDED` answers (pretty JSON) from a double started with :data:`RECORD_SEED` and
    :data:`HEALTH_KNOBS`; ``tests/servers/test_consul_npm_double.py`` checks the double still serves them."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    with ConsulNpmDouble(seed=RECORD_SEED, knobs=HEALTH_KNOBS) as double:
        for name, (path, cookies, method, body) in RECORDED.items():
            reply = double.request(method, path, cookies=cookies, body=body)
            if reply.status != 200:
                raise RuntimeError(f"{method} {path}: HTTP {reply.status}")
            target = directory / name
            target.write_text(json.dumps(reply.json(), indent=2) + "\n")
            written.append(target)
    return written


if __name__ == "__main__":  # python -m tests.servers.consul_npm: re-record tests/fixtures/consul/npm/
    for written_path in record():
        print(written_path)
