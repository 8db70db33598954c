"""Testing helpers: testing mode for users' unit tests, and real HTTP/1.1 backends on loopback.

**Testing mode** (:func:`set_testing`): for unit tests of code that uses meshlib, with respx,
pytest-httpx or ``httpx.MockTransport``. While it is on, every meshlib client in the process sends mesh
requests with their logical URL (``http://payments/charge``, what the code under test wrote and the mocks
route on), asks no discovery, does not wait between attempts, makes ``attempts`` attempts per call (1: no
retries) without a retry budget, and records nothing in breakers or outlier detection. Process-wide, like
stamina's ``set_testing``: turn it on in a fixture, or use it as a context manager.

**Backends** (:class:`Backend`), for tests that exercise the mesh itself against real servers (ours and our
users') and ``meshlib demo``.

A :class:`Backend` is a tiny HTTP/1.1 server built on asyncio streams and h11. It runs its own
event loop in a dedicated daemon thread, so plain synchronous tests can use it as easily as async
ones, and it never competes with the event loop of the code under test.

Why not uvicorn: a mesh is tested by making backends misbehave in precise ways -- answer late, answer
503 with ``Retry-After``, read a request and then hang up without answering, stop accepting
connections while keeping the port number -- and by observing exactly what reached them (how many
requests, over how many connections, with which headers). Those need control over the socket, which
a framework server hides.

Typical use::

    from meshlib.testing import Backend, Behavior, start_backends

    with Backend("a") as a:
        httpx.get(a.url + "/hello")
        assert a.count == 1
        a.behavior = Behavior(status=503, headers=(("retry-after", "1"),))
        a.refuse()  # connects now fail with ECONNREFUSED
        a.accept()  # ... and succeed again, on the same port

    with start_backends(3) as group:
        ...  # group[0].url, group.addresses, group.count

The module depends on nothing but the standard library and h11, because it ships with meshlib.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import random
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar, cast, overload

import h11

from meshlib._testmode import MODE as _MODE

__all__ = [
    "Backend",
    "BackendGroup",
    "Behavior",
    "RecordedRequest",
    "TestingMode",
    "is_testing",
    "lognormal_delay",
    "set_testing",
    "start_backends",
]

logger = logging.getLogger("meshlib.testing")

_T = TypeVar("_T")

_READ_SIZE = 65536
_DEFAULT_BACKLOG = 1024
_DEFAULT_MAX_RECORDS = 100_000
#: Responses that must not carry a body (RFC 9110 6.4.1); h11 would reject one.
_BODYLESS_STATUSES = frozenset({204, 304})


class TestingMode:
    """What :func:`set_testing` returns: usable as a context manager that puts back the previous mode on exit."""

    __slots__ = ("_previous",)

    def __init__(self, previous: tuple[bool, int]) -> None:
        self._previous = previous

    def __enter__(self) -> TestingMode:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        _MODE.attempts = self._previous[1]
        _MODE.enabled = self._previous[0]


def set_testing(enabled: bool = True, *, attempts: int = 1) -> TestingMode:
    """Turn testing mode on (or off) for every meshlib client of the process, from their next call on.

    In testing mode a mesh call (to a host that names a mesh service):

    * reaches the inner transport with its **logical URL** (``http://payments/charge``), so respx, pytest-httpx
      and ``httpx.MockTransport`` routes written against the URL the code calls match (the ``Host`` header and
      meshlib's ``grpc-timeout``/``traceparent`` headers are there as in production);
    * asks **no discovery**: the service (still declared, by ``MESHLIB_SERVICE_<NAME>`` or ``services=``) has
      one stand-in endpoint, so a test needs no DNS or Consul, and a call that no mock answers goes to the
      logical host itself (and fails to resolve, as an unmocked call should);
    * makes at most ``attempts`` attempts (default 1: no retries, as stamina's default), with **no wait**
      between them (no backoff, no ``Retry-After``) and no retry budget; the deadline still applies;
    * records nothing in **circuit breakers or outlier detection**, so one test's failures cannot eject or
      break anything for the next.

    Process-wide, like stamina's ``set_testing``: for test suites, never for production code. Use it in a
    fixture, or as a context manager that restores the previous mode::

        with meshlib.testing.set_testing(True, attempts=2):
            ...

    ``attempts`` must be an integer of at least 1 (``ValueError`` otherwise).
    """
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise ValueError(f"attempts={attempts!r} is invalid: expected an integer >= 1 (attempts per call)")
    previous = (_MODE.enabled, _MODE.attempts)
    _MODE.attempts = attempts
    _MODE.enabled = bool(enabled)
    return TestingMode(previous)


def is_testing() -> bool:
    """Whether testing mode (:func:`set_testing`) is on."""
    return _MODE.enabled


@dataclasses.dataclass(frozen=True)
class Behavior:
    """How a :class:`Backend` answers: an immutable value, swapped atomically via ``backend.behavior = ...``.

    Because it is immutable, assigning a new one from any thread is safe: each request reads the
    backend's current behavior once, when it has been fully received, and uses that value throughout.
    Derive variants with :func:`dataclasses.replace`.

    Attributes:
        status: Response status code (200-599; informational responses cannot be final).
        delay: Seconds to wait before answering. The wait is an ``asyncio.sleep`` in the backend's
            loop, so other connections keep being served meanwhile. If the client hangs up during
            the wait, the backend notices and closes its side immediately (no leaked connection).
        delay_fn: Optional extra latency, called once per request, added to ``delay``; lets the
            demo and benchmarks model a distribution (see :func:`lognormal_delay`). Negative results
            count as zero. It is called in the backend thread.
        drop: Read the whole request (body included), record and count it, then close the
            connection without answering. Clients see "server disconnected without a response"
            (httpx: ``RemoteProtocolError``). ``delay`` applies before the drop.
        body: Response body. ``None`` means a JSON echo of the request:
            ``{"backend", "method", "path", "host", "headers"}`` (``host`` is the Host header,
            i.e. the logical name a mesh client addressed; ``headers`` are lower-cased).
        headers: Extra response headers, e.g. ``(("retry-after", "2"),)``. A ``content-type``
            here replaces the default one.
        fail_fraction: A gray failure: this fraction (0-1) of requests is answered at once (no delay)
            with ``fail_status`` and an empty body, the rest as above. Deterministic and spread evenly
            over the backend's requests (0.3: the 4th, 7th, 10th, 14th...), so failures never come
            two in a row below one half.
        fail_status: The status of those failed requests (default 500).
    """

    status: int = 200
    delay: float = 0.0
    delay_fn: Callable[[], float] | None = None
    drop: bool = False
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    fail_fraction: float = 0.0
    fail_status: int = 500

    def __post_init__(self) -> None:
        if not 200 <= self.status <= 599:
            raise ValueError(f"status must be within 200..599, got {self.status}")
        if not (self.delay >= 0 and math.isfinite(self.delay)):
            raise ValueError(f"delay must be a finite number >= 0, got {self.delay}")
        if not 0.0 <= self.fail_fraction <= 1.0:
            raise ValueError(f"fail_fraction must be within 0..1, got {self.fail_fraction}")
        if not 200 <= self.fail_status <= 599:
            raise ValueError(f"fail_status must be within 200..599, got {self.fail_status}")
        for pair in self.headers:
            if len(pair) != 2 or not all(isinstance(part, str) for part in pair):
                raise ValueError(f"headers must be (name, value) string pairs, got {pair!r}")

    def total_delay(self) -> float:
        """Seconds to wait before answering one request: ``delay`` plus a draw of ``delay_fn``."""
        extra = self.delay_fn() if self.delay_fn is not None else 0.0
        return max(0.0, self.delay + extra)


def lognormal_delay(median: float, sigma: float = 0.5, *, seed: int | None = None) -> Callable[[], float]:
    """Return a ``delay_fn`` drawing lognormal latencies (seconds) around ``median``.

    Real service latencies are right-skewed: most requests are fast, a few are much slower. A
    lognormal with ``sigma`` ~0.5 gives a p99 about 3x the median, which is what makes latency-aware
    balancing (and its demo) interesting. ``seed`` makes the sequence reproducible.
    """
    if median <= 0 or sigma < 0:
        raise ValueError("median must be > 0 and sigma >= 0")
    rng = random.Random(seed)
    mu = math.log(median)

    def draw() -> float:
        return rng.lognormvariate(mu, sigma)

    return draw


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    """One request as a :class:`Backend` received it, recorded once its body was fully read.

    Attributes:
        backend: Name of the backend that received it.
        method: Request method, e.g. ``"GET"``.
        path: Request target as sent (path and query string).
        headers: Header names lower-cased; repeated headers joined with ``", "``.
        raw_headers: Every header line in order, names lower-cased, values as sent.
        body: The request body, de-chunked.
        received_at: ``time.monotonic()`` when the request was fully received.
        connection_id: Serial number (per backend, from 1) of the connection it arrived on; two
            requests with the same id were carried by one keep-alive connection.
        peer: Client address as ``"ip:port"``.
        peercert: With TLS, the client certificate as returned by :meth:`ssl.SSLSocket.getpeercert`
            (only populated when the server context verifies client certificates); else ``None``.
        behavior: The behavior the backend applied to this request.
    """

    backend: str
    method: str
    path: str
    headers: dict[str, str]
    raw_headers: tuple[tuple[str, str], ...]
    body: bytes
    received_at: float
    connection_id: int
    peer: str
    peercert: dict[str, Any] | None
    behavior: Behavior


@dataclasses.dataclass
class _Connection:
    """One open client connection: its streams, h11 state and identity (loop-thread only)."""

    id: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    task: asyncio.Task[Any] | None
    peer: str
    peercert: dict[str, Any] | None
    http: h11.Connection = dataclasses.field(default_factory=lambda: h11.Connection(h11.SERVER))


class _ClientGone(Exception):
    """The client closed its side (or reset) while we still had something to do."""


def _format_address(sockaddr: Any) -> str:
    """``host:port`` (``[host]:port`` for IPv6) from a socket address tuple."""
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        host = str(sockaddr[0])
        return f"[{host}]:{sockaddr[1]}" if ":" in host else f"{host}:{sockaddr[1]}"
    return str(sockaddr)


class Backend:
    """A loopback HTTP/1.1 (or HTTPS) server whose answers and availability tests control.

    ``start()`` binds and returns once the backend accepts connections; ``stop()`` closes the
    listener and every open connection and joins the thread. Use it as a context manager to do both.
    All public methods and properties are safe to call from any thread except the backend's own.

    Supports persistent connections (several requests per connection), pipelining, request bodies
    with Content-Length or chunked encoding, ``Expect: 100-continue`` and HEAD. Every fully
    received request is counted and recorded (see :attr:`requests`); ``max_records`` bounds the
    memory used by the recording during long benchmarks (the counter is never bounded).

    Args:
        name: Identifies the backend in the JSON echo, the ``x-backend`` response header,
            :class:`RecordedRequest` and its thread name.
        host: IP address to bind (an IP literal; IPv6 works too).
        port: Port to bind; 0 lets the kernel choose. The chosen port is kept across
            :meth:`refuse`/:meth:`accept` and :meth:`stop`/:meth:`start`.
        behavior: Initial :class:`Behavior`; reassign :attr:`behavior` at any time.
        ssl_context: Serve HTTPS with this server-side context. Make it verify client
            certificates (``CERT_OPTIONAL``/``CERT_REQUIRED``) to see them in ``peercert``.
        backlog: Listen backlog; generous so hundreds of simultaneous connects are not dropped.
        max_records: How many recent requests :attr:`requests` keeps (``None``: all).
    """

    def __init__(
        self,
        name: str = "backend",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        behavior: Behavior = Behavior(),
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = _DEFAULT_BACKLOG,
        max_records: int | None = _DEFAULT_MAX_RECORDS,
    ) -> None:
        if "\r" in name or "\n" in name:
            raise ValueError("backend name must not contain CR or LF (it is sent in a header)")
        self.name = name
        self.behavior = behavior
        self._host = host
        self._port = port
        self._ssl_context = ssl_context
        self._backlog = backlog
        self._name_header = name.encode("utf-8")

        # Counters and records, shared with the loop thread; the condition guards them all.
        self._cond = threading.Condition()
        self._count = 0
        self._hangups = 0
        self._requests: deque[RecordedRequest] = deque(maxlen=max_records)
        self._connections_total = 0
        self._connections_open = 0
        self._connections_closed = 0

        # Lifecycle: only touched under _lifecycle_lock (callers) or in the loop thread.
        self._lifecycle_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._connections: dict[int, _Connection] = {}
        self._connection_ids = itertools.count(1)

    # ------------------------------------------------------------------ addresses

    @property
    def host(self) -> str:
        """The IP address the backend binds to."""
        return self._host

    @property
    def port(self) -> int:
        """The bound port (the kernel-chosen one once started, if constructed with ``port=0``)."""
        return self._port

    @property
    def address(self) -> str:
        """``"host:port"`` (``"[host]:port"`` for IPv6), the form discovery sources list."""
        return _format_address((self._host, self._port))

    @property
    def scheme(self) -> str:
        """``"https"`` when serving TLS, else ``"http"``."""
        return "https" if self._ssl_context is not None else "http"

    @property
    def url(self) -> str:
        """Base URL, e.g. ``"http://127.0.0.1:41234"`` (no trailing slash)."""
        return f"{self.scheme}://{self.address}"

    # ------------------------------------------------------------------ observations

    @property
    def count(self) -> int:
        """Requests fully received since start or :meth:`reset` (dropped ones included)."""
        with self._cond:
            return self._count

    @property
    def hangups(self) -> int:
        """Requests whose client hung up before the answer (during the behavior's ``delay``): a cancelled
        call, a hedge that lost its race, a client that timed out."""
        with self._cond:
            return self._hangups

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the recorded requests, oldest first (at most ``max_records`` of them)."""
        with self._cond:
            return list(self._requests)

    @property
    def connections_open(self) -> int:
        """Client connections currently open (TLS ones counted once the handshake succeeded)."""
        with self._cond:
            return self._connections_open

    @property
    def connections_total(self) -> int:
        """Client connections accepted since start or :meth:`reset`."""
        with self._cond:
            return self._connections_total

    @property
    def connections_closed(self) -> int:
        """Client connections that have ended (either side closed them) since start or :meth:`reset`."""
        with self._cond:
            return self._connections_closed

    @property
    def running(self) -> bool:
        """Whether the backend thread is running (it may still be refusing connections)."""
        return self._thread is not None

    @property
    def listening(self) -> bool:
        """Whether connection attempts are currently accepted (started and not refusing)."""
        return self._server is not None

    def reset(self) -> None:
        """Zero ``count``, ``connections_total`` and ``connections_closed`` and forget recorded requests.

        Neither the behavior nor open connections are affected.
        """
        with self._cond:
            self._count = 0
            self._hangups = 0
            self._connections_total = 0
            self._connections_closed = 0
            self._requests.clear()

    def wait_for(self, n: int, timeout: float = 5.0) -> bool:
        """Block until at least ``n`` requests were received; ``False`` if ``timeout`` ran out first.

        For tests that must synchronise on arrival (e.g. the request reached the backend before
        asserting on something else) without sleeping. It blocks the calling thread.
        """
        with self._cond:
            return self._cond.wait_for(lambda: self._count >= n, timeout)

    def wait_for_hangups(self, n: int, timeout: float = 5.0) -> bool:
        """Block until at least ``n`` clients hung up before their answer (:attr:`hangups`); ``False`` on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._hangups >= n, timeout)

    def wait_closed(self, n: int, timeout: float = 5.0) -> bool:
        """Block until at least ``n`` client connections have ended (:attr:`connections_closed`); ``False`` on
        timeout. For tests that a client closed a connection (a retired pooled one) without sleeping."""
        with self._cond:
            return self._cond.wait_for(lambda: self._connections_closed >= n, timeout)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Block until no client connection is open; ``False`` if ``timeout`` ran out first.

        For leak tests: after a client is closed, its connections disappear here once the backend
        has seen the hang-up, which happens asynchronously.
        """
        with self._cond:
            return self._cond.wait_for(lambda: self._connections_open == 0, timeout)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Backend:
        """Bind, start the backend thread and return once connections are accepted.

        Binding happens in the calling thread, so an address in use raises ``OSError`` here. After
        :meth:`stop`, ``start()`` may be called again and rebinds the same port.
        """
        with self._lifecycle_lock:
            if self._thread is not None:
                raise RuntimeError(f"backend {self.name!r} is already started")
            sock = self._bind()
            ready = threading.Event()
            failure: list[BaseException] = []
            thread = threading.Thread(
                target=self._run, args=(sock, ready, failure), name=f"meshlib-testing-{self.name}", daemon=True
            )
            thread.start()
            ready.wait()
            if failure:
                thread.join()
                sock.close()
                raise RuntimeError(f"backend {self.name!r} failed to start") from failure[0]
            self._thread = thread
        logger.debug("backend %s listening on %s", self.name, self.url)
        return self

    def stop(self) -> None:
        """Close the listener and all connections, stop the loop and join the thread. Idempotent."""
        with self._lifecycle_lock:
            thread, loop, stopping = self._thread, self._loop, self._stopping
            if thread is None:
                return
            if threading.current_thread() is thread:
                raise RuntimeError("Backend.stop() cannot be called from the backend's own thread")
            if loop is not None and stopping is not None:
                with contextlib.suppress(RuntimeError):  # the loop already ended (it crashed)
                    loop.call_soon_threadsafe(stopping.set)
            thread.join()
            self._thread = None
            self._loop = None
            self._stopping = None
            self._server = None
        logger.debug("backend %s stopped", self.name)

    def refuse(self, *, close_connections: bool = True) -> None:
        """Stop listening (the port number is kept) so new connections get ``ECONNREFUSED``.

        By default open connections are closed too, as when a process dies: a client's pooled
        keep-alive connections then fail over to new connection attempts, which are refused. Pass
        ``close_connections=False`` to model a server that stops accepting but finishes what it has.
        """
        self._call(self._refuse(close_connections))

    def accept(self) -> None:
        """Listen again on the same port after :meth:`refuse`. A no-op if already listening."""
        with self._lifecycle_lock:
            if self._thread is None:
                raise RuntimeError(f"backend {self.name!r} is not started")
            if self._server is not None:
                return
            sock = self._bind()
            try:
                self._call(self._listen(sock))
            except BaseException:
                sock.close()
                raise

    def __enter__(self) -> Backend:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "listening" if self.listening else "running" if self.running else "stopped"
        return f"<Backend {self.name!r} {self.url} {state}>"

    # ------------------------------------------------------------------ internals: thread and loop

    def _bind(self) -> socket.socket:
        """Create the listening socket (SO_REUSEADDR, so the port can be re-bound after refuse/stop)."""
        family, type_, proto, _, sockaddr = socket.getaddrinfo(
            self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
        )[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(self._backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        return sock

    def _run(self, sock: socket.socket, ready: threading.Event, failure: list[BaseException]) -> None:
        """Thread body: run the backend's event loop until :meth:`stop`."""
        try:
            asyncio.run(self._main(sock, ready))
        except BaseException as exc:
            if ready.is_set():
                logger.exception("backend %s: event loop crashed", self.name)
            else:
                failure.append(exc)
        finally:
            self._server = None
            ready.set()

    async def _main(self, sock: socket.socket, ready: threading.Event) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._on_loop_exception)
        self._loop = loop
        self._stopping = asyncio.Event()
        await self._listen(sock)
        ready.set()
        try:
            await self._stopping.wait()
        finally:
            await self._refuse(close_connections=True)

    def _on_loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Route asyncio's complaints (failed TLS handshakes, resets) to our logger, not stderr."""
        exc = context.get("exception")
        if isinstance(exc, (OSError, ssl.SSLError, asyncio.CancelledError)):
            logger.debug("backend %s: %s (%r)", self.name, context.get("message"), exc)
        else:
            logger.warning("backend %s: %s", self.name, context.get("message"), exc_info=exc)

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` in the backend loop and wait for its result (from another thread)."""
        loop = self._loop
        if loop is None or self._thread is None:
            coro.close()
            raise RuntimeError(f"backend {self.name!r} is not started")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("cannot call this from the backend's own thread")
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    async def _listen(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_server(
            self._serve_connection, sock=sock, ssl=self._ssl_context, backlog=self._backlog, limit=_READ_SIZE
        )

    async def _refuse(self, close_connections: bool) -> None:
        server, self._server = self._server, None
        if server is not None:
            # Closes the listening socket at once. (Not awaiting wait_closed(): on Python >= 3.12 it
            # also waits for client connections to end, which is the caller's choice here.)
            server.close()
        if close_connections and self._connections:
            # Aborting the transport wakes every handler (reads see EOF, writes fail) and lets it
            # clean up by itself; cancelling is only a fallback, since asyncio logs a spurious
            # error for a cancelled client_connected_cb task.
            tasks: set[asyncio.Task[Any]] = set()
            for connection in list(self._connections.values()):
                connection.writer.transport.abort()
                if connection.task is not None:
                    tasks.add(connection.task)
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=1.0)
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.wait(pending)

    # ------------------------------------------------------------------ internals: HTTP

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one client connection: any number of request/response cycles."""
        connection = _Connection(
            id=next(self._connection_ids),
            reader=reader,
            writer=writer,
            task=asyncio.current_task(),
            peer=_format_address(writer.get_extra_info("peername")),
            peercert=writer.get_extra_info("peercert") or None,
        )
        self._connections[connection.id] = connection
        with self._cond:
            self._connections_total += 1
            self._connections_open += 1
        try:
            while await self._serve_one(connection):
                connection.http.start_next_cycle()
        except _ClientGone:
            with self._cond:
                self._hangups += 1
                self._cond.notify_all()
        except h11.RemoteProtocolError as exc:
            logger.debug("backend %s: bad request from %s: %s", self.name, connection.peer, exc)
            await self._send_error(connection, exc.error_status_hint)
        except (OSError, ssl.SSLError) as exc:
            logger.debug("backend %s: connection from %s failed: %r", self.name, connection.peer, exc)
        except Exception:
            logger.exception("backend %s: error serving %s", self.name, connection.peer)
        finally:
            del self._connections[connection.id]
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            with self._cond:
                self._connections_open -= 1
                self._connections_closed += 1
                self._cond.notify_all()

    async def _serve_one(self, connection: _Connection) -> bool:
        """Read one request and answer it; return whether the connection may carry another."""
        event = await self._next_event(connection)
        if isinstance(event, h11.ConnectionClosed):
            return False
        if not isinstance(event, h11.Request):
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}", error_status_hint=400)
        request = event
        chunks: list[bytes] = []
        while True:
            event = await self._next_event(connection)
            if isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}", error_status_hint=400)

        behavior = self.behavior
        raw_headers = tuple((bytes(k).decode("latin-1"), bytes(v).decode("latin-1")) for k, v in request.headers)
        headers: dict[str, str] = {}
        for key, value in raw_headers:
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        recorded = RecordedRequest(
            backend=self.name,
            method=request.method.decode("ascii"),
            path=request.target.decode("latin-1"),
            headers=headers,
            raw_headers=raw_headers,
            body=b"".join(chunks),
            received_at=time.monotonic(),
            connection_id=connection.id,
            peer=connection.peer,
            peercert=connection.peercert,
            behavior=behavior,
        )
        with self._cond:
            self._count += 1
            served = self._count
            self._requests.append(recorded)
            self._cond.notify_all()
        share = behavior.fail_fraction
        if share and math.floor(served * share) != math.floor((served - 1) * share):
            behavior = Behavior(status=behavior.fail_status, body=b"")

        delay = behavior.total_delay()
        if delay > 0:
            await self._sleep_watching_client(connection, delay)
        if behavior.drop:
            return False  # the caller closes the connection without answering

        http = connection.http
        connection.writer.write(self._render_response(http, behavior, recorded))
        await connection.writer.drain()
        return http.our_state is h11.DONE and http.their_state is h11.DONE

    def _render_response(self, conn: h11.Connection, behavior: Behavior, request: RecordedRequest) -> bytes:
        """Serialise the whole response (head, body, end) into one buffer: one write per response."""
        status = behavior.status
        has_content_type = False
        response_headers: list[tuple[bytes, bytes]] = [(b"x-backend", self._name_header)]
        for key, value in behavior.headers:
            has_content_type = has_content_type or key.lower() == "content-type"
            response_headers.append((key.encode("latin-1"), value.encode("latin-1")))
        body = b""
        if status not in _BODYLESS_STATUSES:
            if behavior.body is not None:
                body = behavior.body
                default_type = b"application/octet-stream"
            else:
                body = self._echo(request)
                default_type = b"application/json"
            if not has_content_type:
                response_headers.append((b"content-type", default_type))
            # HEAD: same headers as GET (h11 then sends no body).
            response_headers.append((b"content-length", str(len(body)).encode("ascii")))
        if request.method == "HEAD":
            body = b""
        out = conn.send(h11.Response(status_code=status, headers=response_headers)) or b""
        if body:
            out += conn.send(h11.Data(data=body)) or b""
        return out + (conn.send(h11.EndOfMessage()) or b"")

    def _echo(self, request: RecordedRequest) -> bytes:
        """The default body: what arrived, so clients can check routing (which backend, which Host)."""
        return json.dumps(
            {
                "backend": self.name,
                "method": request.method,
                "path": request.path,
                "host": request.headers.get("host"),
                "headers": request.headers,
            }
        ).encode("utf-8")

    async def _next_event(self, connection: _Connection) -> h11.Event | type[h11.PAUSED]:
        """The next h11 event, reading from the socket as needed."""
        http = connection.http
        while True:
            event = http.next_event()
            if event is not h11.NEED_DATA:
                return cast("h11.Event | type[h11.PAUSED]", event)
            if http.they_are_waiting_for_100_continue:
                connection.writer.write(http.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
            http.receive_data(await connection.reader.read(_READ_SIZE))  # b"" tells h11 about EOF

    async def _sleep_watching_client(self, connection: _Connection, delay: float) -> None:
        """Wait ``delay`` seconds, but raise :class:`_ClientGone` as soon as the client hangs up.

        Without watching, a client that timed out would keep the connection (and
        ``connections_open``) alive for the rest of a possibly long delay. Bytes that arrive meanwhile
        (a pipelined request) are handed to h11 for the next cycle.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        while (remaining := deadline - loop.time()) > 0:
            read = asyncio.ensure_future(connection.reader.read(_READ_SIZE))
            try:
                done, _ = await asyncio.wait({read}, timeout=remaining)
                if not done:
                    read.cancel()
                    await asyncio.wait({read})
                    if read.cancelled():
                        return
            finally:
                if not read.done():
                    read.cancel()
            try:
                data = read.result()
            except OSError as exc:
                raise _ClientGone from exc
            if not data:
                raise _ClientGone
            connection.http.receive_data(data)

    async def _send_error(self, connection: _Connection, status: int) -> None:
        """Best effort: answer a malformed request with ``status`` (400 family) before closing."""
        http = connection.http
        if http.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = f"{status} malformed request\n".encode("ascii")
        head = h11.Response(
            status_code=status,
            headers=[
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode("ascii")),
                (b"connection", b"close"),
            ],
        )
        try:
            out = (http.send(head) or b"") + (http.send(h11.Data(data=body)) or b"")
            connection.writer.write(out + (http.send(h11.EndOfMessage()) or b""))
            await connection.writer.drain()
        except (h11.LocalProtocolError, OSError):
            pass


class BackendGroup(Sequence[Backend]):
    """Several :class:`Backend` objects started and stopped together; a sequence of them.

    ``with BackendGroup.of(3) as group: ...`` or, equivalently, ``with start_backends(3) as group``.
    """

    def __init__(self, backends: Iterable[Backend]) -> None:
        self._backends = list(backends)

    @classmethod
    def of(
        cls,
        n: int | None = None,
        *,
        names: Sequence[str] | None = None,
        behavior: Behavior = Behavior(),
        host: str = "127.0.0.1",
        ssl_context: ssl.SSLContext | None = None,
    ) -> BackendGroup:
        """Create (not start) ``n`` backends named ``backend-0``... or one per entry of ``names``."""
        if names is None:
            if n is None:
                raise TypeError("pass n, names, or both")
            names = [f"backend-{i}" for i in range(n)]
        elif n is not None and n != len(names):
            raise ValueError(f"n={n} but {len(names)} names given")
        return cls(Backend(name, host=host, behavior=behavior, ssl_context=ssl_context) for name in names)

    def start(self) -> BackendGroup:
        """Start every backend; if one fails, stop those already started and re-raise."""
        try:
            for backend in self._backends:
                if not backend.running:
                    backend.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every backend (idempotent)."""
        for backend in self._backends:
            backend.stop()

    def __enter__(self) -> BackendGroup:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @overload
    def __getitem__(self, index: int) -> Backend: ...
    @overload
    def __getitem__(self, index: slice) -> list[Backend]: ...
    def __getitem__(self, index: int | slice) -> Backend | list[Backend]:
        return self._backends[index]

    def __len__(self) -> int:
        return len(self._backends)

    def __iter__(self) -> Iterator[Backend]:
        return iter(self._backends)

    def __repr__(self) -> str:
        return f"BackendGroup({self._backends!r})"

    @property
    def addresses(self) -> list[str]:
        """``"host:port"`` of every backend, in order (what a static discovery source takes)."""
        return [backend.address for backend in self._backends]

    @property
    def urls(self) -> list[str]:
        """Base URL of every backend, in order."""
        return [backend.url for backend in self._backends]

    @property
    def total_count(self) -> int:
        """Requests received by all backends together (``count`` is ``Sequence.count``)."""
        return sum(backend.count for backend in self._backends)

    def counts(self) -> dict[str, int]:
        """Requests received per backend name (how a balancer spread the load)."""
        return {backend.name: backend.count for backend in self._backends}

    def set_behavior(self, behavior: Behavior) -> None:
        """Give every backend the same behavior."""
        for backend in self._backends:
            backend.behavior = behavior

    def reset(self) -> None:
        """:meth:`Backend.reset` every backend."""
        for backend in self._backends:
            backend.reset()


def start_backends(
    n: int | None = None,
    *,
    names: Sequence[str] | None = None,
    behavior: Behavior = Behavior(),
    host: str = "127.0.0.1",
    ssl_context: ssl.SSLContext | None = None,
) -> BackendGroup:
    """Start ``n`` backends (or one per name) and return them as a started :class:`BackendGroup`.

    Use as a context manager so they are stopped: ``with start_backends(3) as group: ...``;
    otherwise call ``group.stop()``.
    """
    return BackendGroup.of(n, names=names, behavior=behavior, host=host, ssl_context=ssl_context).start()
