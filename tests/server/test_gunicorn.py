"""A real ``gunicorn --preload`` with 2 sync workers whose app uses a client built in the master (issue 10, item 1).

The app (``tests/server/gunicorn_app.py``) builds a module-level ``meshlib.Client`` at import and uses it once,
in the master, before gunicorn forks. The workers must then each answer with their own connections (every
answer the echo of its own request) and each follow a discovery change (a real dnsmasq record change).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from meshlib.testing import Backend
from tests.conftest import BackendFactory
from tests.discovery.conftest import require_dnsmasq
from tests.httplib import httpx
from tests.servers.dnsmasq import Dnsmasq, SrvRecord

pytest.importorskip("gunicorn", reason="gunicorn is in the dev extra")
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="gunicorn is POSIX-only")

ROOT = Path(__file__).resolve().parents[2]
SRV_NAME = "_http._tcp.users.internal"
WORKERS = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _point_srv(dns: Dnsmasq, backend: Backend) -> None:
    dns.set_records(
        hosts={"web.users.internal": [backend.host]},
        srv=[SrvRecord(SRV_NAME, "web.users.internal", backend.port)],
        ttl=1,
    )


class Gunicorn:
    """``gunicorn --preload -w 2`` serving the test app on a loopback port, in its own process group (``app`` and
    ``options`` replace the app and the options before ``--worker-class sync --bind``)."""

    def __init__(
        self,
        environ: dict[str, str],
        log: Path,
        *,
        app: str = "tests.server.gunicorn_app:app",
        options: Sequence[str] = ("--preload", "--workers", str(WORKERS)),
    ) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "gunicorn", *options, "--worker-class", "sync"]
        command += ["--bind", f"127.0.0.1:{self.port}", "--graceful-timeout", "5", app]
        env = {**os.environ, **environ, "PYTHONPATH": str(ROOT)}
        with log.open("wb") as output:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll the port until the master listens (with --preload the app is imported before it binds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"gunicorn exited with {self.process.returncode}:\n{self.output()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)  # a readiness poll of another process: there is no event to wait on
        pytest.fail(f"gunicorn did not listen on {self.port} within {timeout} s:\n{self.output()}")

    def stop(self) -> None:
        """SIGTERM the whole process group (master and workers), SIGKILL if it lingers."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
            except ProcessLookupError:
                pass


@pytest.fixture
def dns() -> Iterator[Dnsmasq]:
    with Dnsmasq(hosts={}, ttl=1, domains=("internal",), binary=require_dnsmasq()) as server:
        yield server


def test_preloaded_client_in_gunicorn_workers(dns: Dnsmasq, start_backends: BackendFactory, tmp_path: Path) -> None:
    old, new = start_backends(2)
    _point_srv(dns, old)
    host, port = dns.server
    environ = {
        "MESHLIB_SERVICE_USERS": f"dns+srv://{SRV_NAME}",
        "MESHLIB_DNS_SERVERS": f"{host}:{port}",
        "MESHLIB_DNS_TTL_MIN": "100ms",
        "MESHLIB_DNS_TIMEOUT": "500ms",
    }
    server = Gunicorn(environ, tmp_path / "gunicorn.log")
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=10, trust_env=False) as http:

            def ask(path: str) -> dict[str, Any]:
                answer: dict[str, Any] = http.get(path).json()
                return answer

            # Many requests, four at a time so both workers serve: each answer must echo its own request.
            paths = [f"/req{i}" for i in range(300)]
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(ask, paths))
            assert [a["path"] for a in answers] == paths, server.output()
            assert {a["endpoint"] for a in answers} == {old.address}
            workers = {a["pid"] for a in answers}
            master = answers[0]["master"]
            assert len(workers) == WORKERS and master not in workers, (workers, master)
            assert old.wait_for(301)  # the master's warm-up request and ours
            warm = {r.connection_id for r in old.requests if r.path == "/warm"}
            assert not warm & {r.connection_id for r in old.requests if r.path.startswith("/req")}

            # Discovery changes: every worker follows it with its own refresh thread.
            _point_srv(dns, new)
            moved: set[int] = set()
            deadline = time.monotonic() + 20
            while moved != workers and time.monotonic() < deadline:
                answer = ask("/after")
                assert answer["pid"] in workers, "a worker was replaced (crashed?)\n" + server.output()
                if answer["endpoint"] == new.address:
                    moved.add(answer["pid"])
            assert moved == workers, f"workers {workers - moved} never saw the new records\n{server.output()}"
    finally:
        server.stop()
