"""The admin endpoint's HTTP server under hostile peers: half-sent requests, huge heads, floods, garbage.

Real sockets on loopback against :class:`meshlib.admin.AdminServer` (the server a client's
``MESHLIB_ADMIN_ADDR`` starts), with the limits passed small where a test needs one to trip.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from meshlib import admin

pytestmark = pytest.mark.one_library

HALF_REQUEST = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # no blank line: the head never ends


def _admin_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("meshlib-admin")]


def _connect(server: admin.AdminServer) -> socket.socket:
    return socket.create_connection(server.address, timeout=10)


def _exchange(server: admin.AdminServer, data: bytes) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it (bounded by a 10 s timeout)."""
    with _connect(server) as sock:
        sock.sendall(data)
        return _read_to_end(sock)


def _read_to_end(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:  # closed with our unread bytes in its buffer: closed all the same
        pass
    return b"".join(chunks)


def _get_status(server: admin.AdminServer) -> bytes:
    return _exchange(server, b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")


@pytest.fixture
def make_server() -> Iterator[type[admin.AdminServer]]:
    started: list[admin.AdminServer] = []

    class Tracked(admin.AdminServer):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            started.append(self)

    yield Tracked
    for server in started:
        server.close()


def test_half_sent_requests_hold_no_thread_and_close_leaves_nothing_behind(
    make_server: type[admin.AdminServer], capfd: pytest.CaptureFixture[str]
) -> None:
    assert _admin_threads() == []
    before = set(threading.enumerate())
    server = make_server(("127.0.0.1", 0), head_timeout=120)  # none of them times out during the test
    held = []
    try:
        for _ in range(200):
            sock = _connect(server)
            sock.sendall(HALF_REQUEST)
            held.append(sock)
        # While the 200 are held, a complete request is answered (it was accepted after them: FIFO).
        answer = _get_status(server)
        assert answer.startswith(b"HTTP/1.0 200 OK\r\n")
        assert b'"clients": []' in answer
        assert len(set(threading.enumerate()) - before) == 1  # one server thread: none per connection ...
        assert server.connections == 200  # ... while every half-sent request is held
        server.close()
        assert not set(threading.enumerate()) - before
        assert _admin_threads() == []
        for sock in held:  # close() closed every connection it held
            assert _read_to_end(sock) == b""
    finally:
        for sock in held:
            sock.close()
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_a_request_head_must_arrive_in_time(make_server: type[admin.AdminServer]) -> None:
    server = make_server(("127.0.0.1", 0), head_timeout=0.2)
    with _connect(server) as half, _connect(server) as silent:
        half.sendall(HALF_REQUEST)
        assert _read_to_end(half).startswith(b"HTTP/1.0 408 Request Timeout\r\n")
        assert _read_to_end(silent).startswith(b"HTTP/1.0 408 ")  # an idle connection is not kept either
    assert server.connections == 0
    answer = _get_status(server)  # answered, then closed: no keep-alive connection is held
    assert answer.startswith(b"HTTP/1.0 200 OK\r\n") and b"Connection: close\r\n" in answer


@pytest.mark.parametrize("complete", [False, True], ids=["unfinished", "finished"])
def test_the_request_head_is_bounded(make_server: type[admin.AdminServer], complete: bool) -> None:
    server = make_server(("127.0.0.1", 0))
    head = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Filler: " + b"a" * 20_000
    answer = _exchange(server, head + (b"\r\n\r\n" if complete else b""))
    assert answer.startswith(b"HTTP/1.0 431 Request Header Fields Too Large\r\n")
    assert server.connections == 0


def test_beyond_the_connection_bound_the_oldest_is_closed(make_server: type[admin.AdminServer]) -> None:
    server = make_server(("127.0.0.1", 0), max_connections=5, head_timeout=120)
    held = [_connect(server) for _ in range(5)]
    try:
        for sock in held:
            sock.sendall(HALF_REQUEST)
        assert _get_status(server).startswith(b"HTTP/1.0 200 OK\r\n")  # the newcomer is served ...
        assert _read_to_end(held[0]) == b""  # ... and the oldest was closed to make room
        assert server.connections == 4
    finally:
        for sock in held:
            sock.close()


def test_garbage_gets_an_error_answer_and_nothing_on_stderr(
    make_server: type[admin.AdminServer], capfd: pytest.CaptureFixture[str]
) -> None:
    server = make_server(("127.0.0.1", 0))
    assert _exchange(server, b"\x16\x03\x01garbage\r\n\r\n").startswith(b"HTTP/1.0 400 ")
    assert _exchange(server, b"POST /status HTTP/1.1\r\nContent-Length: 0\r\n\r\n").startswith(b"HTTP/1.0 501 ")
    assert _exchange(server, b"GET /status HTTP/1.1\r\nHost: evil.example\r\n\r\n").startswith(b"HTTP/1.0 403 ")
    with _connect(server) as sock:  # a peer that resets mid-request
        sock.sendall(HALF_REQUEST)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    assert _get_status(server).startswith(b"HTTP/1.0 200 OK\r\n")
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
