"""What every source of in-memory certificates shares: the material, the SSL contexts built from it, and the
whole-context swap into every context handed out.

Used by :mod:`meshlib.security.workload_api` (SPIFFE Workload API) and :mod:`meshlib.security.consul_ca`
(Consul Connect's agent endpoints). A source turns each update into a :class:`Material` and hands it to its
:class:`ContextSet`, which builds *every* new inner context first and only then swaps them into the
:class:`~meshlib.security.tls.ReloadingContext` fronts it gave out: a failure leaves all of them on the last
good material, and no connection ever sees a new certificate with an old key.

**Key material on disk.** ``ssl.SSLContext.load_cert_chain`` reads only files. On Linux the chain and key go
into an anonymous in-memory file (``memfd_create``, read back through ``/proc/self/fd``): never on disk,
invisible to other processes. Elsewhere, a private temporary directory (mode 0700) holds one 0600 file for the
duration of the load, then both are removed.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import ssl
import tempfile
import threading
import weakref
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshlib.security.identity import ExpectedIdentity, IdentityContext
from meshlib.security.tls import ReloadingContext, TLSSettings

__all__ = ["ContextSet", "Material", "client_inner", "load_cert_chain", "reset_locks", "server_inner"]


@dataclass(frozen=True, slots=True)
class Material:
    """One usable identity: PEM chain + key (one blob), PEM CAs to trust, the SPIFFE ID, expiry, serial."""

    cert_and_key: bytes = field(repr=False)
    cadata: str = field(repr=False)
    spiffe_id: str
    trust_domain: str
    not_after: datetime.datetime
    serial: int


def load_cert_chain(context: ssl.SSLContext, cert_and_key: bytes) -> None:
    """``load_cert_chain`` from memory: a memfd on Linux, else a 0600 file in a private 0700 directory."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("meshlib-svid", os.MFD_CLOEXEC)
        try:
            os.write(fd, cert_and_key)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    directory = tempfile.mkdtemp(prefix="meshlib-svid-")  # mode 0700
    try:
        path = os.path.join(directory, "svid.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(cert_and_key)
        context.load_cert_chain(path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def client_inner(material: Material, expected: ExpectedIdentity) -> ssl.SSLContext:
    """A client context presenting ``material`` and requiring ``expected`` of the server (no host-name check)."""
    context = IdentityContext(ssl.PROTOCOL_TLS_CLIENT)
    context.expected_identity = expected
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = False  # the SPIFFE ID check replaces it (an SVID names a workload, not a host)
    context.load_verify_locations(cadata=material.cadata)
    load_cert_chain(context, material.cert_and_key)
    return context


def server_inner(material: Material) -> ssl.SSLContext:
    """A server context presenting ``material`` and requiring a client certificate that chains to its CAs."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=material.cadata)
    load_cert_chain(context, material.cert_and_key)
    return context


#: How a client context's expected peer identity follows from the material (a fixed ID, or one that depends on
#: the current trust domain, as Consul's SPIFFE IDs do).
Expectation = Callable[[Material], ExpectedIdentity]


class ContextSet:
    """The client and server :class:`ReloadingContext` fronts of one source, kept on its current material.

    Not locked itself: the owning source calls every method under its own lock (it also guards the source's
    other state). :meth:`apply` builds every inner context first, then swaps them all in.
    """

    def __init__(self) -> None:
        self.material: Material | None = None
        self._clients: dict[Hashable, tuple[Expectation, ReloadingContext]] = {}
        self._server: ReloadingContext | None = None

    def client(self, key: Hashable, expectation: Expectation, settings: TLSSettings) -> ReloadingContext:
        """The client context for ``key`` (made on first use from the current material, then shared)."""
        found = self._clients.get(key)
        if found is None:
            assert self.material is not None
            inner = client_inner(self.material, expectation(self.material))
            found = (expectation, ReloadingContext(settings, inner, not_after=self.material.not_after))
            self._clients[key] = found
        return found[1]

    def server(self) -> ReloadingContext:
        """The server context (made on first use, then shared)."""
        if self._server is None:
            assert self.material is not None
            inner = server_inner(self.material)
            self._server = ReloadingContext(TLSSettings(), inner, not_after=self.material.not_after)
        return self._server

    def apply(self, material: Material) -> None:
        """Make ``material`` current: build every context, then swap each in (raises, changing nothing, if one
        cannot be built)."""
        clients = {key: client_inner(material, expect(material)) for key, (expect, _) in self._clients.items()}
        server = server_inner(material) if self._server is not None else None
        self.material = material
        for key, inner in clients.items():
            self._clients[key][1].swap(inner, material.not_after)
        if server is not None and self._server is not None:
            self._server.swap(server, material.not_after)

    def contexts(self) -> list[ReloadingContext]:
        """Every context handed out."""
        found = [context for _, context in self._clients.values()]
        if self._server is not None:
            found.append(self._server)
        return found


def reset_locks(contexts: Iterable[ReloadingContext]) -> None:
    """In a forked child: new locks for ``contexts`` (a thread of the parent may have held the old ones)."""
    for context in contexts:
        context._check_lock = threading.Lock()
        context._changed = threading.Condition()


class _Forkable(Protocol):
    def _after_fork(self) -> None: ...


class ForkReset:
    """The sources of one kind in this process (weakly), each told to let go of the parent's connections in a
    forked child (``_after_fork``, with only the forking thread running); what they let go of is kept here
    (:attr:`abandoned`) so the garbage collector never closes the parent's connections from the child."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.sources: weakref.WeakSet[Any] = weakref.WeakSet()
        self.abandoned: list[object] = []
        if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
            os.register_at_fork(after_in_child=self._reset)

    def add(self, source: _Forkable) -> None:
        self.sources.add(source)

    def _reset(self) -> None:
        for source in list(self.sources):
            try:
                source._after_fork()
            except Exception:  # never let one source stop the others from letting go of the parent's
                logging.getLogger("meshlib.security").exception("resetting %s after fork() failed", self.what)
