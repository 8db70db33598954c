"""Clients across ``os.fork()`` (issue 10, item 1) and clients dropped without ``close()`` (item 7).

A forked child must never send on the parent's pooled connections (both processes would read each other's
responses), must refresh discovery itself (threads do not survive a fork), and a client dropped unclosed
must not leave its discovery thread (or task) querying forever. Every test talks to real loopback backends,
and the DNS ones to a real dnsmasq; the child reports to the parent through a pipe.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import meshlib
from meshlib.testing import Backend
from meshlib.tools.cli import fetch_status
from tests.conftest import BackendFactory, LogEvent, LogWatch
from tests.discovery.conftest import require_dnsmasq
from tests.servers.dnsmasq import Dnsmasq, SrvRecord

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork() is POSIX-only")

SRV_NAME = "_http._tcp.users.internal"
#: How long a child may run before it is killed (a deadlock in the child must fail the test, not hang it).
CHILD_LIMIT = 60


def _in_child(work: Callable[[], Any], write: int) -> None:
    """The child's side of a fork: run ``work``, send its result (or its error) up the pipe, exit at once."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(CHILD_LIMIT)
    try:
        try:
            report: dict[str, Any] = {"ok": work()}
        except BaseException as exc:
            report = {"error": repr(exc)}
        os.write(write, json.dumps(report).encode())
    finally:
        os._exit(0)  # never run pytest's teardown (or anything else of the parent's) in the child


def _both(work: Callable[[str], Any]) -> tuple[Any, Any]:
    """Fork; run ``work("parent")`` here and ``work("child")`` in the child, at the same time; both results."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        _in_child(lambda: work("child"), write)
    os.close(write)
    try:
        mine = work("parent")
    finally:
        with os.fdopen(read, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
    theirs = json.loads(data) if data else {"error": f"the child died without reporting (wait status {status})"}
    assert "error" not in theirs, f"the child failed: {theirs['error']}"
    return mine, theirs["ok"]


def _echo_many(client: Any, tag: str, n: int = 300) -> int:
    """Send ``n`` requests with distinct paths; how many answers were not the echo of their own request."""
    wrong = 0
    for i in range(n):
        path = f"/{tag}{i}"
        try:
            if client.get(f"http://svc{path}").json()["path"] != path:
                wrong += 1
        except Exception:  # a response garbled by another process's bytes is a wrong answer too
            wrong += 1
    return wrong


def _connections(backend: Backend, prefix: str) -> set[int]:
    return {r.connection_id for r in backend.requests if r.path.startswith(prefix)}


def test_sync_client_used_before_fork_never_mixes_responses(start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1)
    with meshlib.Client(environ={"MESHLIB_SERVICE_SVC": f"static://{backend.address}"}) as client:
        assert client.get("http://svc/warm").json()["path"] == "/warm"  # a pooled keep-alive connection now
        wrong = _both(lambda tag: _echo_many(client, tag))
        assert client.get("http://svc/after").json()["path"] == "/after"  # the parent's client still works
    assert wrong == (0, 0)
    assert backend.count == 602
    # The child connected anew: it never sent on the connection the parent pooled before the fork.
    parent = _connections(backend, "/warm") | _connections(backend, "/parent") | _connections(backend, "/after")
    child = _connections(backend, "/child")
    assert child and not child & parent


def test_async_client_built_before_fork_works_on_the_childs_loop(start_backends: BackendFactory) -> None:
    """An event loop does not survive a fork: the child's own loop gets fresh pools and discovery."""
    (backend,) = start_backends(1)
    client = meshlib.AsyncClient(environ={"MESHLIB_SERVICE_SVC": f"static://{backend.address}"})

    async def echo(tag: str, n: int) -> int:
        wrong = 0
        for i in range(n):
            path = f"/{tag}{i}"
            if (await client.get(f"http://svc{path}")).json()["path"] != path:
                wrong += 1
        return wrong

    async def main() -> Any:
        try:
            assert await echo("warm", 1) == 0
            # Fork from a worker thread while this loop runs: the child runs an event loop of its own.
            return await asyncio.to_thread(_both, lambda side: asyncio.run(echo(side, 100)) if side == "child" else 0)
        finally:
            await client.aclose()

    _, wrong = asyncio.run(main())
    assert wrong == 0
    assert backend.count == 101
    assert not _connections(backend, "/child") & _connections(backend, "/warm")


# -- discovery after a fork (dnsmasq) --------------------------------------------------------------------------


@pytest.fixture
def dns() -> Iterator[Dnsmasq]:
    with Dnsmasq(hosts={}, ttl=1, domains=("internal",), binary=require_dnsmasq()) as server:
        yield server


def _env(dns: Dnsmasq) -> dict[str, str]:
    host, port = dns.server
    return {
        "MESHLIB_SERVICE_USERS": f"dns+srv://{SRV_NAME}",
        "MESHLIB_DNS_SERVERS": f"{host}:{port}",
        "MESHLIB_DNS_TTL_MIN": "100ms",
        "MESHLIB_DNS_TIMEOUT": "500ms",
    }


def _point_srv(dns: Dnsmasq, backend: Backend, ttl: int = 1) -> None:
    dns.set_records(
        hosts={"web.users.internal": [backend.host]},
        srv=[SrvRecord(SRV_NAME, "web.users.internal", backend.port)],
        ttl=ttl,
    )


def test_discovery_change_after_fork_reaches_the_child(
    dns: Dnsmasq, start_backends: BackendFactory, log_event: LogWatch
) -> None:
    old, new = start_backends(2)
    _point_srv(dns, old)
    changed_here = log_event("endpoints of service users changed")
    with meshlib.Client(environ=_env(dns)) as client:
        assert client.get("http://users/").extensions["meshlib.endpoint"] == old.address  # refreshing from now on
        ready_read, ready_write = os.pipe()
        go_read, go_write = os.pipe()
        result_read, result_write = os.pipe()
        pid = os.fork()
        if pid == 0:

            def child() -> list[str]:
                changed = LogEvent("endpoints of service users changed")
                logging.getLogger("meshlib").addHandler(changed)
                first = client.get("http://users/").extensions["meshlib.endpoint"]
                changed.event.clear()  # the child's own first discovery logs its first set
                os.write(ready_write, b"r")
                os.read(go_read, 1)  # the parent has changed the records
                assert changed.event.wait(15), "the child's discovery never refreshed"
                return [first, client.get("http://users/").extensions["meshlib.endpoint"]]

            _in_child(child, result_write)
        os.close(result_write)
        try:
            assert os.read(ready_read, 1) == b"r", "the child never made its first request"
            changed_here.clear()
            _point_srv(dns, new)
            os.write(go_write, b"g")
            assert changed_here.wait(15), "the parent's discovery never refreshed"
            assert client.get("http://users/").extensions["meshlib.endpoint"] == new.address
        finally:
            with os.fdopen(result_read, "rb") as pipe:
                data = pipe.read()
            os.waitpid(pid, 0)
            for fd in (ready_read, ready_write, go_read, go_write):
                os.close(fd)
    report = json.loads(data) if data else {"error": "the child died without reporting"}
    assert report == {"ok": [old.address, new.address]}


# -- clients dropped without close() (item 7) ------------------------------------------------------------------


def _discovery_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("meshlib-discovery")}


#: One SSL context for the 50 clients below (each would otherwise load the CA bundle twice: ~0.1 s a client).
_CONTEXT = ssl.create_default_context()


def test_dropped_clients_end_their_discovery_threads(dns: Dnsmasq, start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1)
    # A long TTL: each thread would sleep 30 s before its next query; only the client's collection wakes it.
    _point_srv(dns, backend, ttl=30)
    before = _discovery_threads()
    started: set[threading.Thread] = set()
    for _ in range(50):
        client = meshlib.Client(environ=_env(dns), verify=_CONTEXT)
        assert client.get("http://users/").status_code == 200
        started |= _discovery_threads() - before
    assert len(started) == 50
    del client
    gc.collect()
    deadline = time.monotonic() + 10  # one bound for all (not 10 s each): only "did not hang"
    for thread in started:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert [t.name for t in started if t.is_alive()] == []


@pytest.mark.anyio
async def test_dropped_async_clients_end_their_refresh_tasks(dns: Dnsmasq, start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1)
    _point_srv(dns, backend, ttl=30)
    started: set[asyncio.Task[Any]] = set()
    for _ in range(50):
        client = meshlib.AsyncClient(environ=_env(dns), verify=_CONTEXT)
        assert (await client.get("http://users/")).status_code == 200
        started |= {t for t in asyncio.all_tasks() if t.get_name().startswith("meshlib-discovery")}
    assert len(started) == 50
    del client
    gc.collect()
    _, pending = await asyncio.wait(started, timeout=10)
    assert pending == set()
    assert all(task.cancelled() for task in started)


def test_fork_while_another_thread_holds_a_first_discovery_lock(start_backends: BackendFactory) -> None:
    """A thread starting a service's first discovery at the fork: the child must not wait on its lock."""
    (backend,) = start_backends(1)
    with meshlib.Client(environ={"MESHLIB_SERVICE_SVC": f"static://{backend.address}"}) as client:
        lock = client.mesh._start_lock
        held, forked = threading.Event(), threading.Event()

        def first_request_under_way() -> None:
            with lock:  # what _activate holds while it starts a service's refresh thread
                held.set()
                forked.wait(10)

        holder = threading.Thread(target=first_request_under_way)
        holder.start()
        assert held.wait(10)
        try:
            _, child = _both(lambda side: client.get(f"http://svc/{side}").json()["path"] if side == "child" else "")
        finally:
            forked.set()
            holder.join(10)
        assert child == "/child"
        assert client.get("http://svc/parent").json()["path"] == "/parent"


def test_admin_endpoint_stays_the_parents(start_backends: BackendFactory) -> None:
    """The child does not serve the parent's admin endpoint, and closing its client there does not hang."""
    from meshlib import admin

    (backend,) = start_backends(1)
    environ = {"MESHLIB_SERVICE_SVC": f"static://{backend.address}", "MESHLIB_ADMIN_ADDR": "127.0.0.1:0"}
    client = meshlib.Client(environ=environ)
    try:
        address = client.admin_address
        assert address is not None

        def child() -> list[Any]:
            seen = client.admin_address
            client.close()  # the inherited server has no thread here: stopping it must not wait for one
            return [seen, len(admin.running())]

        _, (seen, running) = _both(lambda side: child() if side == "child" else None)
        assert (seen, running) == (None, 0)
        assert fetch_status(address)["pid"] == os.getpid()  # type: ignore[index]  # the parent still serves, its own state
    finally:
        client.close()


def test_routes_file_keeps_steering_and_reloading_in_the_child(tmp_path: Any, start_backends: BackendFactory) -> None:
    """A client with MESHLIB_ROUTES_FILE built before fork: the child routes by the same table, and a new version
    of the file reaches it through the child's own watcher (threads do not survive a fork)."""
    from tests.routing.test_routes_file import one_backend, write

    v1, v2 = start_backends(2)
    path = tmp_path / "routes.yaml"
    write(path, one_backend("payments-v1", "one"))
    env = {
        "MESHLIB_ROUTES_FILE": str(path),
        "MESHLIB_ROUTES_RELOAD_INTERVAL": "0.05",
        "MESHLIB_SERVICE_PAYMENTS_V1": f"static://{v1.address}",
        "MESHLIB_SERVICE_PAYMENTS_V2": f"static://{v2.address}",
    }
    with meshlib.Client(environ=env) as client:
        assert client.get("http://payments/").headers["x-table"] == "one"

        def work(side: str) -> Any:
            if side == "parent":
                return None
            first = client.get("http://payments/").headers["x-table"]
            source = client.mesh.routes_source
            seen = source.changes
            write(path, one_backend("payments-v2", "two"))
            changed = source.wait_change(seen, 30)  # the child's own poll thread picks it up
            return [first, changed, client.get("http://payments/").headers["x-backend"]]

        _, child = _both(work)
    assert child == ["one", True, "b1"]
