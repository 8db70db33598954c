"""A real dnsmasq on 127.0.0.1, serving the A, AAAA and SRV records a test chooses.

    with Dnsmasq(hosts={"users.internal": ["127.0.0.1", "::1"]},
                 srv=[SrvRecord("_http._tcp.users.internal", "web1.users.internal", 8081)]) as server:
        settings = server.settings(timeout=1.0)       # DiscoverySettings pointing at it
        ...
        server.set_records(hosts={...})               # restart with new records, same port

Records are written to a config file (``host-record=`` with the chosen TTL for addresses, ``srv-host=`` for
SRV, whose TTL is ``--local-ttl``). Every domain the records live in is declared ``local=/<domain>/``, so an
unknown name there is NXDOMAIN rather than REFUSED (there is no upstream server).

Why changes restart the process: SIGHUP makes dnsmasq re-read hosts files (``--addn-hosts``,
``--hostsdir``) and ``--servers-file``, but never the main config, where ``srv-host`` and ``host-record``
live. :meth:`Dnsmasq.set_records` therefore stops dnsmasq and starts a new one on the same port; it
returns only once the new process answers a query for a TXT record carrying the config's generation
number, so no test can see the old records after it returns (nor an answer from the old process).

Readiness is a bounded poll of real queries, never a fixed sleep. The port is found by binding UDP and
TCP port 0 on 127.0.0.1 and closing; if dnsmasq then loses the race for it, another port is tried.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from meshlib.discovery.base import DiscoverySettings

__all__ = ["DNSMASQ", "Dnsmasq", "SrvRecord", "find_dnsmasq"]

DNSMASQ = "/usr/sbin/dnsmasq"

_READY_DOMAIN = "meshlib-dnsmasq"
_READY_NAME = f"_ready.{_READY_DOMAIN}"


def find_dnsmasq() -> str | None:
    """The dnsmasq binary: Debian's ``/usr/sbin/dnsmasq``, else one on ``PATH``; ``None`` if absent."""
    if os.access(DNSMASQ, os.X_OK):
        return DNSMASQ
    return shutil.which("dnsmasq")


@dataclass(frozen=True)
class SrvRecord:
    """One SRV record: ``name`` (any name: ``_http._tcp.users.internal``, ``web.payments.service.consul``)."""

    name: str
    target: str
    port: int
    priority: int = 0
    weight: int = 0


class Dnsmasq:
    """A dnsmasq process on ``127.0.0.1:<free port>`` for one test (a context manager).

    ``hosts`` maps a name to its addresses (IPv4 and IPv6 mixed), each served with TTL ``ttl``; ``srv``
    lists SRV records, served with TTL ``srv_ttl`` (default: ``ttl``). ``domains`` are extra domains to
    answer NXDOMAIN for (the last label of every record name is added automatically).
    """

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        hosts: Mapping[str, Iterable[str]] | None = None,
        srv: Iterable[SrvRecord] = (),
        ttl: int = 60,
        srv_ttl: int | None = None,
        domains: Iterable[str] = ("internal",),
        binary: str | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        found = binary or find_dnsmasq()
        if found is None:
            raise FileNotFoundError(f"dnsmasq not found at {DNSMASQ} or on PATH (Debian package dnsmasq-base)")
        self.binary = found
        self.startup_timeout = startup_timeout
        self.port = 0
        self._hosts: dict[str, tuple[str, ...]] = {}
        self._srv: tuple[SrvRecord, ...] = ()
        self._ttl = ttl
        self._srv_ttl = srv_ttl
        self._domains = tuple(domains)
        self._generation = 0
        self._log_offset = 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._store(hosts or {}, srv, ttl, srv_ttl)

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> Dnsmasq:
        """Pick a free port, start dnsmasq and wait until it answers. Returns ``self``."""
        if self._proc is not None:
            raise RuntimeError("dnsmasq already started")
        self._dir = tempfile.TemporaryDirectory(prefix="meshlib-dnsmasq-")
        for _ in range(5):
            self.port = _free_port(self.host)
            if self._try_launch():
                return self
            # Lost the race for the port to another process: try another one.
        log = self.log()
        self.stop()
        raise RuntimeError(f"dnsmasq could not bind a free port after 5 tries:\n{log}")

    def stop(self) -> None:
        """Stop dnsmasq and remove its files. Idempotent."""
        self._terminate()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> Dnsmasq:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- what tests use ----------------------------------------------------------------------------------------

    @property
    def server(self) -> tuple[str, int]:
        """``(ip, port)`` as in ``DiscoverySettings.dns_servers``."""
        return (self.host, self.port)

    @property
    def ttl(self) -> int:
        """TTL of the address records being served."""
        return self._ttl

    @property
    def srv_ttl(self) -> int:
        """TTL of the SRV records being served (dnsmasq's ``--local-ttl``)."""
        return self._ttl if self._srv_ttl is None else self._srv_ttl

    @property
    def hosts(self) -> Mapping[str, tuple[str, ...]]:
        """The address records being served: name -> addresses."""
        return dict(self._hosts)

    @property
    def srv(self) -> tuple[SrvRecord, ...]:
        """The SRV records being served."""
        return self._srv

    def settings(self, timeout: float = 1.0) -> DiscoverySettings:
        """Discovery settings that send every DNS query to this server."""
        return DiscoverySettings(dns_servers=(self.server,), dns_timeout=timeout)

    def set_records(
        self,
        *,
        hosts: Mapping[str, Iterable[str]] | None = None,
        srv: Iterable[SrvRecord] | None = None,
        ttl: int | None = None,
        srv_ttl: int | None = None,
    ) -> None:
        """Replace the records (an argument left ``None`` keeps its current value) and restart on the same port.

        Returns once the new process answers, so the next query sees exactly the new records.
        """
        self._store(
            self._hosts if hosts is None else hosts,
            self._srv if srv is None else srv,
            self._ttl if ttl is None else ttl,
            self._srv_ttl if srv_ttl is None else srv_ttl,
        )
        if self._proc is None:
            return
        self._terminate()
        # The port was ours a moment ago; retry briefly in case the kernel has not released it yet.
        deadline = time.monotonic() + self.startup_timeout
        while not self._try_launch():
            if time.monotonic() > deadline:
                raise RuntimeError(f"dnsmasq could not bind port {self.port} again on restart:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        """What dnsmasq wrote to stderr so far (for failure messages)."""
        if self._dir is None:
            return ""
        path = Path(self._dir.name) / "dnsmasq.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- internals ---------------------------------------------------------------------------------------------

    def _store(
        self, hosts: Mapping[str, Iterable[str]], srv: Iterable[SrvRecord], ttl: int, srv_ttl: int | None
    ) -> None:
        self._hosts = {name: tuple(addresses) for name, addresses in hosts.items()}
        self._srv = tuple(srv)
        self._ttl = ttl
        self._srv_ttl = srv_ttl

    def _config(self) -> str:
        lines = [f'txt-record={_READY_NAME},"{self._generation}"', f"local=/{_READY_DOMAIN}/"]
        domains = set(self._domains)
        for name, addresses in self._hosts.items():
            domains.add(name.rstrip(".").rsplit(".", 1)[-1])
            lines.extend(f"host-record={name},{address},{self._ttl}" for address in addresses)
        for record in self._srv:
            domains.add(record.name.rstrip(".").rsplit(".", 1)[-1])
            lines.append(f"srv-host={record.name},{record.target},{record.port},{record.priority},{record.weight}")
        lines.extend(f"local=/{domain}/" for domain in sorted(domains))
        return "\n".join(lines) + "\n"

    def _try_launch(self) -> bool:
        """Start dnsmasq on ``self.port``; ``False`` if the port was taken (any other failure raises)."""
        try:
            self._launch()
        except _PortTaken:
            return False
        return True

    def _launch(self) -> None:
        assert self._dir is not None
        self._generation += 1
        workdir = Path(self._dir.name)
        conf = workdir / "dnsmasq.conf"
        conf.write_text(self._config())
        args = [
            self.binary,
            "--keep-in-foreground",
            "--no-daemon",  # debug mode: no fork, no pid file, no setuid (so it runs as root or not)
            "--no-resolv",
            "--no-hosts",
            "--pid-file=",
            "--log-facility=-",
            f"--port={self.port}",
            f"--listen-address={self.host}",
            "--bind-interfaces",
            f"--local-ttl={self.srv_ttl}",
            f"--conf-file={conf}",
        ]
        with (workdir / "dnsmasq.log").open("ab") as log:
            self._log_offset = log.tell()
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Poll with real queries until this generation answers, dnsmasq exits, or the timeout passes."""
        assert self._proc is not None
        expected = f'"{self._generation}"'
        query = dns.message.make_query(_READY_NAME, dns.rdatatype.TXT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                log = self.log()[self._log_offset :]
                if "Address already in use" in log:
                    raise _PortTaken(log)
                raise RuntimeError(f"dnsmasq exited at startup on port {self.port}:\n{log}")
            try:
                reply = dns.query.udp(query, self.host, port=self.port, timeout=0.05)
            except (dns.exception.Timeout, dns.query.BadResponse, OSError):
                # BadResponse: a late answer to an earlier poll that timed out, reaching a new socket that got the
                # same ephemeral port (seen once on a loaded machine): not this poll's answer, poll again.
                time.sleep(0.01)
                continue
            if reply.rcode() == dns.rcode.NOERROR and any(
                rdata.to_text() == expected for rrset in reply.answer for rdata in rrset
            ):
                return
            time.sleep(0.01)
        log = self.log()
        self._terminate()
        raise RuntimeError(f"dnsmasq on port {self.port} did not answer within {self.startup_timeout}s:\n{log}")

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class _PortTaken(RuntimeError):
    """dnsmasq could not bind its port (another process took it between our probe and its bind)."""


def _free_port(host: str) -> int:
    """A port free for both UDP and TCP on ``host`` right now (dnsmasq listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")
