"""The call's deadline inside the connection: every socket operation of an attempt is bounded by it.

httpx's timeouts are per operation: ``read`` bounds *each* read. A peer that trickles one byte before every
read timeout, sends an endless chunked body, or endless ``100 Continue`` answers keeps a call going for as long
as it likes, whatever the call's deadline. A mesh's deadline is the budget of the whole logical call (Envoy's
route timeout waits for "a complete response"), so meshlib wraps the network backend of every endpoint pool it
makes (:func:`install`): each connect, read and write has its timeout clamped to the time left before the
deadline of the attempt running in this thread or task, and once that has passed the next operation raises the
HTTP core's timeout at once, which the plan turns into :class:`meshlib.DeadlineExceeded`.

Which deadline applies is a context variable (:data:`DEADLINE`, absolute ``time.monotonic()`` seconds): the
drivers set it around an attempt's send (the call's deadline, or the per-try one when it is earlier), and the
response stream sets it around each read of the body the application makes later, in its own thread or task.
A connection serves one request at a time on HTTP/1.1, so the bound is per request; on HTTP/2 the reads of one
connection are shared, and a read cut by one request's deadline ends the connection (its other streams fail
and may be retried).

The cost on the request path: one context-variable lookup and one clock read per socket operation.
"""

from __future__ import annotations

import functools
import importlib
import logging
import socket
import time
from contextvars import ContextVar
from typing import Any

logger = logging.getLogger("meshlib")

#: The absolute deadline (``time.monotonic()``) of the attempt running in this context, or ``None``: unbounded.
DEADLINE: ContextVar[float | None] = ContextVar("meshlib_deadline", default=None)

#: The :class:`Abort` of the started attempt running in this thread (the blocking driver's hedges), or ``None``.
ABORT: ContextVar[Abort | None] = ContextVar("meshlib_abort", default=None)

_monotonic = time.monotonic


class Abort:
    """Lets another thread stop a blocking attempt on the wire (a hedge race's loser).

    The attempt's socket is shut down, so the read it is blocked in returns at once and its server sees the
    connection close, as an async attempt's cancellation does. An HTTP/2 connection carries other calls'
    streams and is left alone: that attempt is released when its answer arrives. An attempt aborted before its
    first socket operation fails at that operation.
    """

    __slots__ = ("aborted", "stream")

    def __init__(self) -> None:
        self.aborted = False
        self.stream: Any = None

    def watch(self, stream: Any, error: type[Exception]) -> None:
        """The attempt is about to use ``stream`` (called by the bounded stream before each operation)."""
        self.stream = stream
        if self.aborted:
            raise error("the attempt was cancelled: another attempt's answer was accepted")

    def abort(self) -> None:
        """Stop the attempt (idempotent; safe from any thread)."""
        self.aborted = True
        stream = self.stream
        if stream is None:
            return
        try:
            ssl_object = stream.get_extra_info("ssl_object")
            if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
                return
            sock = stream.get_extra_info("socket")
            if sock is not None:
                # socket.socket's own shutdown, also for an SSLSocket (whose override drops its TLS state).
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except (OSError, AttributeError, ValueError):  # already closed, or a stream without a socket
            pass


def _left(timeout: float | None, error: type[Exception]) -> float | None:
    """``timeout`` clamped to the time left before this context's deadline; ``error`` once it has passed."""
    deadline = DEADLINE.get()
    if deadline is None:
        return timeout
    left = deadline - _monotonic()
    if left <= 0:
        raise error("the call's deadline has passed")
    return left if timeout is None or timeout > left else timeout


@functools.cache
def _wrappers(core_name: str) -> tuple[type[Any], type[Any]]:
    """The bounded backend classes for one HTTP core (``httpcore`` for httpx, ``httpcore2`` for httpx2)."""
    core: Any = importlib.import_module(core_name)
    read_timeout: type[Exception] = core.ReadTimeout
    write_timeout: type[Exception] = core.WriteTimeout
    read_error: type[Exception] = core.ReadError
    write_error: type[Exception] = core.WriteError
    connect_timeout: type[Exception] = core.ConnectTimeout

    class Stream(core.NetworkStream):  # type: ignore[misc]
        """A connection whose reads and writes end at the deadline of the attempt using it."""

        __slots__ = ("_inner",)

        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
            abort = ABORT.get()
            if abort is not None:
                abort.watch(self._inner, read_error)
            data: bytes = self._inner.read(max_bytes, _left(timeout, read_timeout))
            return data

        def write(self, buffer: bytes, timeout: float | None = None) -> None:
            abort = ABORT.get()
            if abort is not None:
                abort.watch(self._inner, write_error)
            self._inner.write(buffer, _left(timeout, write_timeout))

        def close(self) -> None:
            self._inner.close()

        def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None) -> Any:
            return Stream(self._inner.start_tls(ssl_context, server_hostname, _left(timeout, connect_timeout)))

        def get_extra_info(self, info: str) -> Any:
            return self._inner.get_extra_info(info)

    class Backend(core.NetworkBackend):  # type: ignore[misc]
        """A network backend whose connections are :class:`Stream`."""

        __slots__ = ("_inner",)

        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def connect_tcp(
            self,
            host: str,
            port: int,
            timeout: float | None = None,
            local_address: str | None = None,
            socket_options: Any = None,
        ) -> Any:
            return Stream(
                self._inner.connect_tcp(
                    host,
                    port,
                    _left(timeout, connect_timeout),
                    local_address=local_address,
                    socket_options=socket_options,
                )
            )

        def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> Any:
            return Stream(
                self._inner.connect_unix_socket(path, _left(timeout, connect_timeout), socket_options=socket_options)
            )

        def sleep(self, seconds: float) -> None:
            self._inner.sleep(seconds)

    class AsyncStream(core.AsyncNetworkStream):  # type: ignore[misc]
        """The async twin of ``Stream``."""

        __slots__ = ("_inner",)

        def __init__(self, inner: Any) -> None:
            self._inner = inner

        async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
            data: bytes = await self._inner.read(max_bytes, _left(timeout, read_timeout))
            return data

        async def write(self, buffer: bytes, timeout: float | None = None) -> None:
            await self._inner.write(buffer, _left(timeout, write_timeout))

        async def aclose(self) -> None:
            await self._inner.aclose()

        async def start_tls(
            self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
        ) -> Any:
            inner = await self._inner.start_tls(ssl_context, server_hostname, _left(timeout, connect_timeout))
            return AsyncStream(inner)

        def get_extra_info(self, info: str) -> Any:
            return self._inner.get_extra_info(info)

    class AsyncBackend(core.AsyncNetworkBackend):  # type: ignore[misc]
        """The async twin of ``Backend``."""

        __slots__ = ("_inner",)

        def __init__(self, inner: Any) -> None:
            self._inner = inner

        async def connect_tcp(
            self,
            host: str,
            port: int,
            timeout: float | None = None,
            local_address: str | None = None,
            socket_options: Any = None,
        ) -> Any:
            stream = await self._inner.connect_tcp(
                host, port, _left(timeout, connect_timeout), local_address=local_address, socket_options=socket_options
            )
            return AsyncStream(stream)

        async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> Any:
            stream = await self._inner.connect_unix_socket(
                path, _left(timeout, connect_timeout), socket_options=socket_options
            )
            return AsyncStream(stream)

        async def sleep(self, seconds: float) -> None:
            await self._inner.sleep(seconds)

    return Backend, AsyncBackend


def install(transport: Any, asynchronous: bool) -> bool:
    """Bound the connections of ``transport`` (an ``httpx``/``httpx2`` HTTP transport meshlib made) by deadlines.

    The transport's connection pool takes its network backend at construction and hands it to every connection
    it opens; the pool has no public setter, so the attribute is replaced before the first connection. If a
    future HTTP core moves it, the call is still bounded between body reads and at each attempt's start, and
    this says so once in the log rather than failing.
    """
    pool: Any = getattr(transport, "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    core_name = type(pool).__module__.partition(".")[0]
    if backend is None or core_name not in ("httpcore", "httpcore2"):
        _warn_once(type(transport).__name__)
        return False
    sync, async_ = _wrappers(core_name)
    if isinstance(backend, (sync, async_)):
        return True
    pool._network_backend = (async_ if asynchronous else sync)(backend)
    return True


@functools.cache
def _warn_once(kind: str) -> None:
    logger.warning(
        "cannot bound the socket operations of %s transports by the call's deadline (their connection pool has no "
        "network backend meshlib knows): a response that keeps arriving is cut only between body reads",
        kind,
    )
