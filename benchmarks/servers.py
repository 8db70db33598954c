"""The servers scenarios run against, each in its own process on loopback, pinned to the server CPU.

* :class:`Nginx` -- Debian's nginx with a generated config: ``n`` ports answering a static 1 KiB body, one
  process (``master_process off``) so its CPU is one pid's. The fastest backend we can get, for overhead.
* :class:`HAProxy` -- Debian's HAProxy in HTTP mode, round robin over the nginx ports, keep-alive to both
  sides, one thread: the "local sidecar" of S2.
* :class:`BackendProcess` -- :mod:`benchmarks.backend` (meshlib.testing backends with injected latency
  and failures), controlled over a pipe.
* :class:`TierProcess` -- :mod:`benchmarks.tier`, a middle service of the S5 call chain.

Every class is a context manager that starts the process, waits until its ports accept connections, and
kills it (by its own pid) on exit.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
BODY_1K = "x" * 1024


class ServerMissing(RuntimeError):
    """A Debian binary the scenario needs is not installed (``./dev.sh bench`` installs it)."""


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (bound then released; fine for a benchmark run)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_listening(ports: Sequence[int], timeout: float = 10.0, proc: subprocess.Popen[Any] | None = None) -> None:
    """Block until every port accepts a TCP connection; raise if ``proc`` died or time ran out."""
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s") from None
                time.sleep(0.02)


def _binary(name: str, package: str) -> str:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ServerMissing(f"{name} not found: apt-get install {package} (./dev.sh bench installs it)")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return {k: v for k, v in env.items() if not k.startswith("MESHLIB_")}


class _Process:
    """A child process killed on exit; ``pid`` is what CPU meters read."""

    proc: subprocess.Popen[Any] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop()


class Nginx(_Process):
    """nginx serving a static 1 KiB answer on ``n`` loopback ports."""

    def __init__(self, n: int = 1, prefix: Sequence[str] = ()) -> None:
        self.n = n
        self.prefix = tuple(prefix)
        self.ports: list[int] = []
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Nginx:
        binary = _binary("nginx", "nginx-light")
        self._dir = tempfile.TemporaryDirectory(prefix="meshlib-bench-nginx-")
        d = self._dir.name
        self.ports = free_ports(self.n)
        servers = "\n".join(
            f'  server {{ listen 127.0.0.1:{p} backlog=4096; location / {{ return 200 "{BODY_1K}"; }} }}'
            for p in self.ports
        )
        temps = "\n".join(f"  {k}_temp_path {d}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        config = f"""daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
{temps}
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  default_type text/plain;
{servers}
}}
"""
        Path(d, "nginx.conf").write_text(config)
        self.proc = subprocess.Popen(
            [*self.prefix, binary, "-p", d, "-c", f"{d}/nginx.conf"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_listening(self.ports, proc=self.proc)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop()
        if self._dir is not None:
            self._dir.cleanup()

    @property
    def addresses(self) -> list[str]:
        """``127.0.0.1:port`` of every server block."""
        return [f"127.0.0.1:{p}" for p in self.ports]


class HAProxy(_Process):
    """HAProxy on one loopback port, balancing round robin over ``upstreams`` with keep-alive both sides."""

    def __init__(self, upstreams: Sequence[str], prefix: Sequence[str] = ()) -> None:
        self.upstreams = list(upstreams)
        self.prefix = tuple(prefix)
        self.port = 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> HAProxy:
        binary = _binary("haproxy", "haproxy")
        self._dir = tempfile.TemporaryDirectory(prefix="meshlib-bench-haproxy-")
        self.port = free_ports(1)[0]
        servers = "\n".join(f"  server s{i} {addr} maxconn 1000" for i, addr in enumerate(self.upstreams))
        config = f"""global
  nbthread 1
  maxconn 4000
defaults
  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  option http-keep-alive
  http-reuse always
frontend fe
  bind 127.0.0.1:{self.port}
  default_backend be
backend be
  balance roundrobin
{servers}
"""
        path = Path(self._dir.name, "haproxy.cfg")
        path.write_text(config)
        self.proc = subprocess.Popen(
            [*self.prefix, binary, "-f", str(path), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_listening([self.port], proc=self.proc)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop()
        if self._dir is not None:
            self._dir.cleanup()


_D = TypeVar("_D", bound="_Driven")


class _Driven(_Process):
    """A ``python -m <module>`` child that announces ``{"ports": [...]}`` and takes JSON commands on stdin.

    Subclasses name the module and its arguments; this holds the protocol both :mod:`benchmarks.backend` and
    :mod:`benchmarks.capacity` speak.
    """

    module = ""
    prefix: tuple[str, ...] = ()
    ports: list[int]

    def _args(self) -> list[str]:
        return []

    def __enter__(self: _D) -> _D:
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", self.module, *self._args()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=_child_env(),
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        if not first:
            raise RuntimeError(f"{self.module} exited before announcing its ports")
        self.ports = list(json.loads(first)["ports"])
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.command({"op": "quit"})
                self.proc.wait(5)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
        self._stop()

    @property
    def addresses(self) -> list[str]:
        """``127.0.0.1:port`` of every backend."""
        return [f"127.0.0.1:{p}" for p in self.ports]

    def command(self, command: dict[str, Any]) -> Any:
        """Send one control command and return its reply (blocking, well under a millisecond)."""
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())


class BackendProcess(_Driven):
    """``count`` meshlib.testing backends in a child process (:mod:`benchmarks.backend`)."""

    module = "benchmarks.backend"

    def __init__(self, count: int, behavior: dict[str, Any] | None = None, prefix: Sequence[str] = ()) -> None:
        self.count = count
        self.behavior = behavior or {}
        self.prefix = tuple(prefix)
        self.ports = []

    def _args(self) -> list[str]:
        return ["--count", str(self.count), "--behavior", json.dumps(self.behavior)]

    def set(self, index: int | None, **spec: Any) -> None:
        """Set the behaviour of backend ``index`` (``None``: all); see :mod:`benchmarks.backend`."""
        self.command({"op": "behavior", "index": index, **spec})

    def refuse(self, index: int) -> None:
        """Make backend ``index`` refuse connections (same port)."""
        self.command({"op": "refuse", "index": index})

    def accept(self, index: int) -> None:
        """Make backend ``index`` accept connections again."""
        self.command({"op": "accept", "index": index})

    def counts(self) -> list[int]:
        """Requests received per backend since start or :meth:`reset`."""
        return list(self.command({"op": "counts"}))

    def hangups(self) -> list[int]:
        """Per backend, requests whose client hung up before the answer (a cancelled hedge, a timeout)."""
        return list(self.command({"op": "hangups"}))

    def reset(self) -> None:
        """Zero the counters and records."""
        self.command({"op": "reset"})

    def records(self, index: int | None, header: str) -> list[tuple[float, str | None]]:
        """``(received_at, header value)`` of the recorded requests of backend ``index`` (``None``: all)."""
        return [(float(t), v) for t, v in self.command({"op": "records", "index": index, "header": header})]


class TierProcess(_Process):
    """A middle service of the S5 chain (:mod:`benchmarks.tier`) calling ``target`` through meshlib."""

    def __init__(self, target: str, env: dict[str, str] | None = None, prefix: Sequence[str] = ()) -> None:
        self.target = target
        self.env = env or {}
        self.prefix = tuple(prefix)
        self.port = 0

    def __enter__(self) -> TierProcess:
        self.port = free_ports(1)[0]
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "benchmarks.tier", "--port", str(self.port), "--next", self.target],
            cwd=ROOT,
            env={**_child_env(), **self.env},
            stdout=subprocess.DEVNULL,
        )
        wait_listening([self.port], timeout=20, proc=self.proc)
        return self

    @property
    def address(self) -> str:
        """``127.0.0.1:port``."""
        return f"127.0.0.1:{self.port}"

    def stats(self) -> dict[str, Any]:
        """Inbound requests, late arrivals and outbound attempts counted by the tier."""
        return dict(json.loads(self._get("/__stats")))

    def reset(self) -> None:
        """Zero the tier's counters."""
        self._get("/__reset")

    def _get(self, path: str) -> bytes:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", path)
            return conn.getresponse().read()
        finally:
            conn.close()
