"""The admin endpoint's HTTP server and request handler (:mod:`meshlib.admin`).

Kept apart so that :mod:`http.server` is imported by the first admin server a process starts
(``MESHLIB_ADMIN_ADDR``), not by ``import meshlib``.

**One thread per admin server, whatever the peers do.** The stdlib's ``ThreadingHTTPServer`` gives every
connection a thread that blocks reading the request: 200 connections that send half a request hold 200
threads for good (no timeout), keep them after ``server_close()``, and each one that finally fails prints a
traceback to stderr. This server is a small event loop instead (:mod:`selectors`, non-blocking sockets):

* a request head (request line and headers) is collected without blocking, and must be complete within
  :data:`HEAD_TIMEOUT` seconds of the connection being accepted and fit in :data:`MAX_HEAD_BYTES` bytes
  (else ``408`` / ``431``, best effort, and the connection is closed);
* the answer is computed on the server thread (``/status`` and ``/metrics`` are in-memory snapshots, a few
  milliseconds) and written without blocking, within :data:`WRITE_TIMEOUT` seconds; then the connection is
  closed (``Connection: close``: no idle keep-alive connection is ever held);
* at most :data:`MAX_CONNECTIONS` connections are held; when a new one arrives beyond that, the *oldest* is
  closed (it is the one nearest its own timeout, and a quick legitimate request still gets through a flood);
* :meth:`AdminHTTPServer.close` wakes the loop, which closes the listener and every open connection before
  its thread ends;
* nothing is written to stderr: protocol errors and unexpected exceptions are logged under
  ``meshlib.admin`` at DEBUG.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import selectors
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

from meshlib.admin import METRICS_HINT, HostPort, _loopback_host, logger

if TYPE_CHECKING:
    from meshlib.admin import AdminServer

__all__ = ["HEAD_TIMEOUT", "MAX_CONNECTIONS", "MAX_HEAD_BYTES", "WRITE_TIMEOUT", "AdminHTTPServer"]

#: Seconds a connection has, from being accepted, to send its whole request head.
HEAD_TIMEOUT = 5.0
#: Seconds a peer has to read the answer once it is ready.
WRITE_TIMEOUT = 5.0
#: Largest request head (request line and headers) read; a larger one is answered 431.
MAX_HEAD_BYTES = 8192
#: Connections held at once (reading a head or writing an answer); beyond it the oldest is closed.
MAX_CONNECTIONS = 256
#: How long the listener rests after ``accept`` failed with no connection to give up (out of descriptors).
_ACCEPT_PAUSE = 0.5
_RECV_SIZE = 4096
_HEAD_ENDS = (b"\r\n\r\n", b"\n\n")


def _canned(status: str) -> bytes:
    text = status.encode()
    return b"HTTP/1.0 " + text + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


_TIMEOUT_ANSWER = _canned("408 Request Timeout")
_TOO_LARGE_ANSWER = _canned("431 Request Header Fields Too Large")


class _Connection:
    """One accepted connection: the head read so far, then the answer left to write, and its deadline."""

    __slots__ = ("address", "deadline", "head", "outgoing", "sock")

    def __init__(self, sock: socket.socket, address: Any, deadline: float) -> None:
        self.sock = sock
        self.address = address
        self.deadline = deadline
        self.head = bytearray()
        self.outgoing: memoryview | None = None  # set once the answer is ready: the bytes not sent yet


class AdminHTTPServer:
    """A single-threaded, non-blocking HTTP/1.0 server on ``address`` (IPv4 or IPv6) for its :class:`AdminServer`.

    :meth:`serve` runs the loop (on the admin server's thread) until :meth:`close`; the timeouts and limits are
    parameters so tests can make them short.
    """

    def __init__(
        self,
        address: HostPort,
        *,
        head_timeout: float = HEAD_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
        max_head_bytes: int = MAX_HEAD_BYTES,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._listener = socket.create_server(address, family=family, backlog=128)
        self._listener.setblocking(False)
        self.server_address: HostPort = self._listener.getsockname()[:2]
        self.admin: AdminServer | None = None
        self._head_timeout = head_timeout
        self._write_timeout = write_timeout
        self._max_head = max_head_bytes
        self._max_connections = max_connections
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        # Touched by the loop's thread only (insertion order = oldest first, for eviction).
        self._connections: dict[socket.socket, _Connection] = {}
        self._selector = selectors.DefaultSelector()

    @property
    def connections(self) -> int:
        """Connections held right now (for tests and diagnostics)."""
        return len(self._connections)

    # -- lifecycle -------------------------------------------------------------------------------------------

    def serve(self) -> None:
        """Accept, read, answer and time out connections until :meth:`close`; then close them all."""
        selector = self._selector
        try:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_read, selectors.EVENT_READ)
            resume_accepting = 0.0
            while not self._stopping.is_set():
                now = time.monotonic()
                if resume_accepting and now >= resume_accepting:
                    selector.register(self._listener, selectors.EVENT_READ)
                    resume_accepting = 0.0
                timeout = self._expire(now)
                if resume_accepting:
                    timeout = max(0.0, min(timeout, resume_accepting - now))
                for key, events in selector.select(timeout):
                    sock: socket.socket = key.fileobj  # type: ignore[assignment]
                    if sock is self._listener:
                        if not self._accept():
                            selector.unregister(self._listener)
                            resume_accepting = time.monotonic() + _ACCEPT_PAUSE
                    elif sock is self._wake_read:
                        self._drain_wakeup()
                    else:
                        self._step(sock, events)
        except Exception:  # never a traceback on stderr, and never a thread left without its sockets closed
            logger.debug("admin server loop failed", exc_info=True)
        finally:
            for sock in list(self._connections):
                self._drop(sock)
            selector.close()
            self._listener.close()
            self._wake_read.close()
            self._stopped.set()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loop; it closes the listener and every open connection. Waits up to ``timeout`` s for that."""
        self._stopping.set()
        with contextlib.suppress(OSError):  # a full wake-up buffer: the loop is being woken anyway
            self._wake_write.send(b"x")
        self._stopped.wait(timeout)
        self._wake_write.close()

    def close_unstarted(self) -> None:
        """Free the port of a server whose :meth:`serve` never ran."""
        self._selector.close()
        self._listener.close()
        self._wake_read.close()
        self._wake_write.close()

    def forget_in_child(self) -> None:
        """In a forked child: close this process's copies of the sockets, leaving the parent's server untouched.

        ``close()`` on a descriptor the parent still holds sends nothing to the peer (only the last close does;
        ``shutdown()`` would, and is never called here); the loop's thread does not exist in the child.
        """
        for sock in (*self._connections, self._listener, self._wake_read, self._wake_write):
            with contextlib.suppress(OSError):
                sock.close()
        self._connections = {}
        with contextlib.suppress(OSError, RuntimeError):
            self._selector.close()

    # -- the loop's steps ------------------------------------------------------------------------------------

    def _drain_wakeup(self) -> None:
        try:
            while self._wake_read.recv(64):
                pass
        except OSError:
            pass

    def _accept(self) -> bool:
        """Accept what is waiting; ``False`` when accepting failed with nothing left to close (pause the listener)."""
        for _ in range(64):  # a bounded batch, so a flood cannot starve the connections already held
            try:
                sock, address = self._listener.accept()
            except BlockingIOError:
                return True
            except OSError as error:  # out of file descriptors, typically: free one, else rest a moment
                logger.debug("admin accept failed: %s", error)
                if not self._connections:
                    return False
                self._drop(next(iter(self._connections)))
                continue
            if len(self._connections) >= self._max_connections:
                oldest = next(iter(self._connections))
                logger.debug("admin: %d connections held, closing the oldest", len(self._connections))
                self._drop(oldest)
            sock.setblocking(False)
            self._connections[sock] = _Connection(sock, address, time.monotonic() + self._head_timeout)
            self._selector.register(sock, selectors.EVENT_READ)
        return True

    def _expire(self, now: float) -> float:
        """Close the connections past their deadline; seconds until the next deadline (or a long wait)."""
        wait = 3600.0
        for sock, connection in list(self._connections.items()):
            left = connection.deadline - now
            if left <= 0:
                logger.debug("admin: connection from %s timed out", connection.address)
                if connection.outgoing is None:
                    _try_send(sock, _TIMEOUT_ANSWER)
                self._drop(sock)
            else:
                wait = min(wait, left)
        return wait

    def _step(self, sock: socket.socket, events: int) -> None:
        connection = self._connections.get(sock)
        if connection is None:
            return
        try:
            if connection.outgoing is None:
                self._read(connection)
            else:
                self._write(connection)
        except Exception:  # a peer's bytes must never stop the loop or reach stderr
            logger.debug("admin: connection from %s failed", connection.address, exc_info=True)
            self._drop(sock)

    def _read(self, connection: _Connection) -> None:
        sock = connection.sock
        try:
            data = sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(sock)
            return
        if not data:  # the peer gave up before finishing its request
            self._drop(sock)
            return
        head = connection.head
        start = max(0, len(head) - 3)
        head += data
        if not any(end in head[start:] for end in _HEAD_ENDS):
            if len(head) >= self._max_head:
                logger.debug("admin: request head from %s over %d bytes", connection.address, self._max_head)
                _try_send(sock, _TOO_LARGE_ANSWER)
                self._drop(sock)
            return
        if len(head) > self._max_head:
            _try_send(sock, _TOO_LARGE_ANSWER)
            self._drop(sock)
            return
        answer = _Handler.answer(bytes(head), connection.address, self)
        connection.outgoing = memoryview(answer)
        connection.deadline = time.monotonic() + self._write_timeout
        self._selector.modify(sock, selectors.EVENT_WRITE)
        self._write(connection)

    def _write(self, connection: _Connection) -> None:
        sock, outgoing = connection.sock, connection.outgoing
        assert outgoing is not None
        try:
            sent = sock.send(outgoing)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(sock)
            return
        connection.outgoing = outgoing = outgoing[sent:]
        if not outgoing:
            self._drop(sock, finished=True)

    def _drop(self, sock: socket.socket, *, finished: bool = False) -> None:
        """Forget and close one connection (forgotten first: once the peer sees the end, it is not counted)."""
        self._connections.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        if finished:  # the whole answer is out: end our side cleanly before closing
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        sock.close()


def _try_send(sock: socket.socket, data: bytes) -> None:
    """Send a short canned answer if the socket takes it now; never block, never fail."""
    with contextlib.suppress(OSError):
        sock.send(data)


class _Handler(BaseHTTPRequestHandler):
    """Turns one complete request head into the whole answer (bytes), with the stdlib's parsing and checks."""

    server: AdminHTTPServer  # type: ignore[assignment]
    server_version = "meshlib-admin"
    protocol_version = "HTTP/1.0"  # one request per connection: nothing is kept open after the answer
    default_request_version = "HTTP/1.0"  # so an answer to an unparsable request line has a status line too

    def __init__(self, head: bytes, address: Any, server: AdminHTTPServer) -> None:
        self._head = head
        super().__init__(None, address, server)  # type: ignore[arg-type]  # no socket: setup() reads ``head``

    @classmethod
    def answer(cls, head: bytes, address: Any, server: AdminHTTPServer) -> bytes:
        """The bytes to send back for request ``head``."""
        try:
            handler = cls(head, address, server)
        except Exception:  # a bug answering must not cost the loop, nor print a traceback
            logger.debug("admin: answering %s failed", address, exc_info=True)
            return _canned("500 Internal Server Error")
        out: bytes = handler.wfile.getvalue()  # type: ignore[attr-defined]
        return out

    def setup(self) -> None:
        self.rfile = io.BytesIO(self._head)
        self.wfile = io.BytesIO()

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()

    def finish(self) -> None:  # the buffers are read by ``answer``; there is no socket to flush or close
        pass

    def do_GET(self) -> None:
        if not _loopback_host(self.headers.get("Host")):
            self._answer(403, b"meshlib admin answers requests for loopback hosts only\n", "text/plain")
            return
        path = self.path.split("?", 1)[0]
        admin = self.server.admin
        if admin is None:
            self._answer(503, b"meshlib admin is starting\n", "text/plain")
        elif path == "/status":
            body = json.dumps(admin.status(), indent=2).encode() + b"\n"
            self._answer(200, body, "application/json")
        elif path == "/metrics":
            text = admin.metrics_text()
            if text is None:
                self._answer(404, METRICS_HINT.encode(), "text/plain")
            else:
                self._answer(200, text[0], text[1])
        elif path == "/config_dump":
            body = json.dumps(admin.config_dump(), indent=2).encode() + b"\n"
            self._answer(200, body, "application/json")
        elif path == "/":
            self._answer(
                200,
                b"meshlib admin\n  /status       JSON snapshot of every client\n  /metrics      Prometheus\n"
                b"  /config_dump  xDS resources held, CSDS-shaped\n",
                "text/plain",
            )
        else:
            self._answer(404, b"not found: try /status, /metrics or /config_dump\n", "text/plain")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # never stderr, never a log line per request above DEBUG
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("admin %s " + format, self.address_string(), *args)
