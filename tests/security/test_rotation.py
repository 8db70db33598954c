"""Certificate rotation: files re-read when they change, new connections use them, nothing in flight breaks.

Most tests call :meth:`ReloadingContext.check` themselves (``MESHLIB_TLS_RELOAD_INTERVAL=0`` turns the
watcher off), so each step is deterministic; the mid-traffic tests let the watcher thread do it and wait on
the context's generation and the backend's request count, never on time.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

import meshlib
from meshlib.security import TLSContexts, TLSSettings
from meshlib.testing import Backend, Behavior
from tests.httplib import httpx
from tests.security.conftest import TLSBackendFactory, mesh_env
from tests.security.pki import CA, DAY, NOW, Leaf, common_name, replace_file

CLOSE = Behavior(headers=(("connection", "close"),))  # every request on a new connection (a new handshake)


class Secret:
    """A Kubernetes-style secret volume: ``tls.crt``/``tls.key`` -> ``..data/`` -> a versioned directory.

    Updating writes a new version directory and swaps the ``..data`` symlink with one rename, so readers see
    the old pair or the new pair, never a mix: what kubelet does, and what rotation tools should do.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.version = 0
        directory.mkdir(exist_ok=True)

    @property
    def cert(self) -> str:
        return str(self.directory / "tls.crt")

    @property
    def key(self) -> str:
        return str(self.directory / "tls.key")

    def write(self, leaf: Leaf) -> None:
        self.version += 1
        version = self.directory / f"..v{self.version}"
        version.mkdir()
        (version / "tls.crt").write_bytes(leaf.chain_pem)
        (version / "tls.key").write_bytes(leaf.key_pem)
        link = self.directory / "..data_tmp"
        link.symlink_to(version.name)
        os.replace(link, self.directory / "..data")
        for name in ("tls.crt", "tls.key"):
            if not (self.directory / name).is_symlink():
                (self.directory / name).symlink_to(f"..data/{name}")


@dataclass
class MTLS:
    backend: Backend
    env: dict[str, str]
    secret: Secret
    ca: CA


@pytest.fixture
def mtls(ca: CA, tmp_path: Path, tls_backend: TLSBackendFactory) -> MTLS:
    """A backend that requires client certificates from ``ca``, and a client certificate ``v1`` in a secret."""
    backend = tls_backend(ca.issue("payments"), client_ca=ca)
    secret = Secret(tmp_path / "secret")
    secret.write(ca.issue(common_name="v1"))
    env = mesh_env(
        backend,
        TLS_CA_FILE=str(ca.write(tmp_path / "ca.pem")),
        TLS_CERT_FILE=secret.cert,
        TLS_KEY_FILE=secret.key,
        TLS_RELOAD_INTERVAL="0",
    )
    return MTLS(backend, env, secret, ca)


def names(backend: Backend) -> list[str | None]:
    return [common_name(r.peercert) for r in backend.requests]


def test_new_connections_use_the_new_certificate_and_pooled_ones_keep_working(mtls: MTLS) -> None:
    with meshlib.Client(environ=mtls.env) as client:
        context = client.tls_contexts["PAYMENTS"]
        assert client.get("https://payments/").status_code == 200
        assert not context.check()  # nothing changed
        mtls.secret.write(mtls.ca.issue(common_name="v2"))
        assert context.check()
        assert context.generation == 2
        assert client.get("https://payments/").status_code == 200  # the pooled connection: still v1
        mtls.backend.behavior = CLOSE
        assert client.get("https://payments/").status_code == 200  # closes that connection
        assert client.get("https://payments/").status_code == 200  # a new handshake: v2
    requests = mtls.backend.requests
    assert [r.connection_id for r in requests] == [1, 1, 1, 2]
    assert names(mtls.backend) == ["v1", "v1", "v1", "v2"]


def test_a_request_in_flight_during_a_reload_completes(mtls: MTLS) -> None:
    mtls.backend.behavior = Behavior(delay=0.3)
    with meshlib.Client(environ=mtls.env) as client, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.get, "https://payments/slow")
        assert mtls.backend.wait_for(1)  # the request is at the server
        mtls.secret.write(mtls.ca.issue(common_name="v2"))
        assert client.tls_contexts["PAYMENTS"].check()
        assert pending.result(timeout=10).status_code == 200


def _expired(ca: CA) -> Leaf:
    return ca.issue(common_name="old", not_before=NOW - 3 * DAY, not_after=NOW - DAY)


@pytest.mark.parametrize(
    ("replace", "reason"),
    [
        (lambda m: m.secret.write(_expired(m.ca)), "expired at"),
        (lambda m: m.secret.write(m.ca.issue(common_name="later", not_before=NOW + 2 * DAY)), "not valid before"),
        (
            lambda m: replace_file(Path(os.path.realpath(m.secret.cert)), b"-----BEGIN CERTIFICATE-----\nxx"),
            "not a PEM",
        ),
        (lambda m: os.unlink(os.path.realpath(m.secret.key)), "cannot be read"),
        (lambda m: replace_file(Path(os.path.realpath(m.secret.key)), CA().issue().key_pem), "does not match"),
        (lambda m: replace_file(Path(os.path.realpath(m.secret.key)), b"not a key"), "no usable PEM private key"),
    ],
)
def test_an_unusable_replacement_keeps_the_last_good_certificate_and_logs_one_error(
    mtls: MTLS, caplog: pytest.LogCaptureFixture, replace: object, reason: str
) -> None:
    mtls.backend.behavior = CLOSE
    with meshlib.Client(environ=mtls.env) as client:
        context = client.tls_contexts["PAYMENTS"]
        with caplog.at_level(logging.INFO, logger="meshlib.security"):
            replace(mtls)  # type: ignore[operator]
            assert not context.check()
            assert not context.check()  # the same broken files: not reported again
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1
        assert reason in errors[0].getMessage()
        assert "keep the previous certificate" in errors[0].getMessage()
        assert "PRIVATE KEY" not in caplog.text
        assert context.generation == 1
        assert client.get("https://payments/").status_code == 200  # a new connection, the old certificate
        mtls.secret.write(mtls.ca.issue(common_name="v2"))  # then a good one arrives
        assert context.check()
        assert client.get("https://payments/").status_code == 200
    assert names(mtls.backend) == ["v1", "v2"]


def test_an_expiring_certificate_without_replacement_is_reported_once(
    mtls: MTLS, caplog: pytest.LogCaptureFixture
) -> None:
    with meshlib.Client(environ=mtls.env) as client:
        context = client.tls_contexts["PAYMENTS"]
        assert context.not_after is not None
        later = context.not_after + datetime.timedelta(seconds=1)
        with caplog.at_level(logging.ERROR, logger="meshlib.security"):
            context.check(now=later)
            context.check(now=later)
    (record,) = caplog.records
    assert "expired at" in record.getMessage()
    assert "no valid replacement" in record.getMessage()


def test_a_new_ca_bundle_replaces_the_old_one(ca: CA, tmp_path: Path, tls_backend: TLSBackendFactory) -> None:
    new_ca = CA("next CA")
    old_server = tls_backend(ca.issue("payments"), name="old")
    old_server.behavior = CLOSE
    new_server = tls_backend(new_ca.issue("billing"), name="new")
    bundle = ca.write(tmp_path / "bundle.pem")
    env = {
        **mesh_env(old_server, "PAYMENTS"),
        **mesh_env(new_server, "BILLING"),
        "MESHLIB_TLS_CA_FILE": str(bundle),
        "MESHLIB_TLS_RELOAD_INTERVAL": "0",
    }
    with meshlib.Client(environ=env) as client:
        assert client.get("https://payments/").status_code == 200
        with pytest.raises(httpx.ConnectError):
            client.get("https://billing/")
        new_ca.write(bundle)  # the old CA is removed from the bundle, not only the new one added
        assert client.tls_contexts["BILLING"].check()
        assert client.get("https://billing/").status_code == 200
        with pytest.raises(httpx.ConnectError, match=r"(?i)certificate verify failed"):
            client.get("https://payments/")


# -- the watcher thread, mid-traffic ---------------------------------------------------------------------------


def _rotate_and_confirm(mtls: MTLS, context: meshlib.security.ReloadingContext) -> int:
    """Rotate to ``v2``, wait for the watcher to load it; the backend's request count at that moment."""
    assert mtls.backend.wait_for(5, timeout=10)  # traffic is flowing with v1
    mtls.secret.write(mtls.ca.issue(common_name="v2"))
    assert context.wait_for_generation(2, timeout=10), "the watcher did not load the new certificate"
    return mtls.backend.count


def test_rotation_mid_traffic_fails_no_request(mtls: MTLS) -> None:
    mtls.backend.behavior = CLOSE
    env = {**mtls.env, "MESHLIB_TLS_RELOAD_INTERVAL": "10ms"}
    stop = threading.Event()
    failures: list[BaseException] = []
    sent = 0

    def traffic(client: meshlib.Client) -> None:
        nonlocal sent
        while not stop.is_set():
            try:
                assert client.get("https://payments/").status_code == 200
                sent += 1
            except BaseException as error:  # any failure is a test failure
                failures.append(error)
                return

    with meshlib.Client(environ=env) as client:
        sender = threading.Thread(target=traffic, args=(client,))
        sender.start()
        try:
            seen = _rotate_and_confirm(mtls, client.tls_contexts["PAYMENTS"])
            assert mtls.backend.wait_for(seen + 2, timeout=10) or failures
        finally:
            stop.set()
            sender.join(timeout=10)
    assert failures == []
    cns = names(mtls.backend)
    # Request seen+2 was sent after the answer to seen+1, which came after the reload: a v2 handshake.
    assert cns[seen + 1] == "v2"
    assert set(cns) == {"v1", "v2"}
    assert sent == len(cns)


@pytest.mark.anyio
async def test_rotation_mid_traffic_fails_no_request_async(mtls: MTLS) -> None:
    mtls.backend.behavior = CLOSE
    env = {**mtls.env, "MESHLIB_TLS_RELOAD_INTERVAL": "10ms"}
    stop = asyncio.Event()

    async def traffic(client: meshlib.AsyncClient) -> int:
        sent = 0
        while not stop.is_set():
            response = await client.get("https://payments/")
            assert response.status_code == 200
            sent += 1
        return sent

    async with meshlib.AsyncClient(environ=env) as client:
        senders = [asyncio.create_task(traffic(client)) for _ in range(4)]
        try:
            seen = await asyncio.to_thread(_rotate_and_confirm, mtls, client.tls_contexts["PAYMENTS"])
            assert await asyncio.to_thread(mtls.backend.wait_for, seen + 8, 10)
        finally:
            stop.set()
        sent = await asyncio.gather(*senders)  # re-raises any failed request
    cns = names(mtls.backend)
    assert sum(sent) == len(cns)
    assert cns[-1] == "v2"
    assert set(cns) == {"v1", "v2"}


def test_the_watcher_stops_with_the_client(mtls: MTLS) -> None:
    env = {**mtls.env, "MESHLIB_TLS_RELOAD_INTERVAL": "10ms"}
    before = set(threading.enumerate())
    with meshlib.Client(environ=env) as client:
        assert not [t for t in threading.enumerate() if t.name == "meshlib-tls-watcher" and t not in before]
        client.get("https://payments/")  # the first endpoint pool starts the watch
        started = [t for t in threading.enumerate() if t.name == "meshlib-tls-watcher" and t not in before]
        assert len(started) == 1
    assert not started[0].is_alive()


def test_the_watcher_ends_when_its_contexts_are_gone(mtls: MTLS) -> None:
    contexts = TLSContexts(reload_interval=0.01)
    context = contexts.context_for(TLSSettings(cert_file=mtls.secret.cert, key_file=mtls.secret.key))
    contexts.watch(context)
    thread = contexts.watcher._thread
    assert thread is not None and thread.is_alive()
    del context, contexts  # a client dropped without close()
    thread.join(timeout=10)
    assert not thread.is_alive()
