"""A hostile HTTP/1.1 peer on loopback: it answers, but never finishes answering.

Each mode keeps a response arriving for as long as the client stays, a little at a time, each piece well within
any per-read timeout, which is what per-operation timeouts cannot stop and a call's deadline must:

* ``headers`` -- the status line, then one byte of a header every ``interval``;
* ``continue`` -- ``100 Continue`` informational responses, one every ``interval``, never a final one;
* ``chunked`` -- a 200 with a chunked body whose chunks never end;
* ``body`` -- a 200 announcing a large ``Content-Length``, then one byte every ``interval``;
* ``silent`` -- reads the request and never answers (what a read timeout alone does handle).

It also makes a mode-independent promise used by tests: :attr:`Hostile.hung_up` is set once the client has
closed a connection the server was still writing to (the client gave up at its deadline and let go of the
socket rather than leaking it).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

MODES = ("headers", "continue", "chunked", "body", "silent")


class Hostile:
    """A threaded TCP server speaking one hostile mode; ``with Hostile("chunked") as h: h.address``."""

    def __init__(self, mode: str, interval: float = 0.02) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.mode = mode
        self.interval = interval
        self.requests = 0
        self.hung_up = threading.Event()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._accept = threading.Thread(target=self._serve, name=f"hostile-{mode}", daemon=True)

    def __enter__(self) -> Hostile:
        self._accept.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop accepting and end every connection."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept() (Linux)
        self._listener.close()
        self._accept.join(5)
        for thread in self._threads:
            thread.join(5)

    def wait_for(self, n: int, timeout: float = 10.0) -> bool:
        """Block until at least ``n`` requests have arrived; ``False`` if ``timeout`` ran out first."""
        with self._arrived:
            return self._arrived.wait_for(lambda: self.requests >= n, timeout)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            with self._lock:
                self.requests += 1
                self._arrived.notify_all()
            try:
                self._answer(conn)
            except OSError:  # the client closed the connection under a write
                self.hung_up.set()

    def _answer(self, conn: socket.socket) -> None:
        mode, wait = self.mode, self._stop.wait
        if mode == "silent":
            while not wait(self.interval):
                if _closed(conn):
                    self.hung_up.set()
                    return
            return
        if mode == "headers":
            conn.sendall(b"HTTP/1.1 200 OK\r\nx-slow: ")
            piece = b"a"
        elif mode == "continue":
            piece = b"HTTP/1.1 100 Continue\r\n\r\n"
        elif mode == "chunked":
            conn.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/plain\r\n\r\n")
            piece = b"1\r\nx\r\n"
        else:  # body
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 100000000\r\ncontent-type: text/plain\r\n\r\n")
            piece = b"x"
        while not wait(self.interval):
            conn.sendall(piece)


def _closed(conn: socket.socket) -> bool:
    """Whether the peer has closed its side (a read would return EOF or fail)."""
    conn.setblocking(False)
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        conn.setblocking(True)
