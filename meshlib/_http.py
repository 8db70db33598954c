"""The HTTP library under a client: httpx or httpx2, seen through one small adapter.

httpx2 is a fork of httpx with the same public API (``import httpx2``, httpcore2 under it), so the request
path is written once against that API and never imports either library by name: it reads the classes it
needs from an :class:`HttpLib`. What differs per library lives here:

* which classes to build requests, streams, pools and errors from (``lib.Request``, ``lib.HTTPTransport``...);
* the response-stream wrappers that keep an attempt's lease until the body is closed (they must subclass the
  library's own ``SyncByteStream`` / ``AsyncByteStream``: httpx checks the stream type of every response);
* meshlib's errors in the library's flavour: ``lib.errors["DeadlineExceeded"]`` subclasses both
  :class:`meshlib.DeadlineExceeded` and ``<lib>.TimeoutException``, and :meth:`HttpLib.localize` re-classes
  a neutral error raised on the request path into that flavour on the way out.

Which library the top-level ``meshlib.Client`` uses is decided in :mod:`meshlib` (``MESHLIB_HTTP_LIBRARY``);
``meshlib.httpx`` and ``meshlib.httpx2`` name each explicitly.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import AsyncIterator, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any

from meshlib import errors as _errors
from meshlib._bounded import DEADLINE

if TYPE_CHECKING:
    from meshlib._lease import Lease
    from meshlib._plan import Call

__all__ = ["LIBRARIES", "HttpLib", "copy_request", "library", "library_of"]

#: The HTTP libraries meshlib runs on, by the name users choose them with (``MESHLIB_HTTP_LIBRARY``).
LIBRARIES = ("httpx", "httpx2")

#: The neutral error kinds that get a per-library flavour, parents before children.
_FLAVOURED = (
    _errors.DiscoveryError,
    _errors.NoEndpointsError,
    _errors.ConsulACLError,
    _errors.CircuitOpenError,
    _errors.OverloadedError,
    _errors.DeadlineExceeded,
    _errors.RedirectRefusedError,
)


class HttpLib:
    """One HTTP library's classes, as the request path uses them. Built once per library (:func:`library`)."""

    def __init__(self, module: ModuleType) -> None:
        self.name: str = module.__name__
        self.module = module
        m: Any = module
        self.Request = m.Request
        self.Response = m.Response
        self.URL = m.URL
        self.Headers = m.Headers
        self.ByteStream = m.ByteStream
        self.SyncByteStream = m.SyncByteStream
        self.AsyncByteStream = m.AsyncByteStream
        self.BaseTransport = m.BaseTransport
        self.AsyncBaseTransport = m.AsyncBaseTransport
        self.HTTPTransport = m.HTTPTransport
        self.AsyncHTTPTransport = m.AsyncHTTPTransport
        self.Limits = m.Limits
        self.HTTPError = m.HTTPError
        self.TransportError = m.TransportError
        self.TimeoutException = m.TimeoutException
        self.create_ssl_context = m.create_ssl_context
        self.errors: dict[str, type[_errors.MeshError]] = {}
        self._by_neutral: dict[type[BaseException], type[BaseException]] = {}
        for neutral in _FLAVOURED:
            self._flavour(neutral)
        self.TrackedStream, self.AsyncTrackedStream = _tracked_streams(self)

    def _flavour(self, neutral: type[_errors.MeshError]) -> None:
        parent = self._by_neutral.get(neutral.__mro__[1])
        family = getattr(self.module, neutral.http_family or "HTTPError")
        bases = (neutral, parent) if parent is not None else (neutral, family)
        cls = type(neutral.__name__, bases, {"__module__": f"meshlib.{self.name}", "__doc__": neutral.__doc__})
        self._by_neutral[neutral] = cls
        self.errors[neutral.__name__] = cls

    def localize(self, exc: BaseException) -> BaseException:
        """``exc`` in this library's flavour when it is a neutral meshlib error (re-classed in place)."""
        cls = self._by_neutral.get(type(exc))
        if cls is not None:
            exc.__class__ = cls
        return exc


def copy_request(request: Any) -> Any:
    """A shallow copy of ``request`` with headers of its own, so changing them leaves the caller's request as it was.

    Not ``Request(...)``: the constructor re-encodes and re-validates what the library already did for the
    caller's request. Same method, URL, body stream and extensions (replace them on the copy, do not mutate them).
    """
    request_type = type(request)
    copy = object.__new__(request_type)
    copy.__dict__.update(request.__dict__)
    copy.headers = type(request.headers)(request.headers)
    return copy


def _tracked_streams(lib: HttpLib) -> tuple[type[Any], type[Any]]:
    """The library's response-stream wrappers that release an attempt's lease when its body is closed or dropped."""

    timeout_error: type[Exception] = lib.TimeoutException

    def past_deadline(call: Call[Any], exc: Exception) -> BaseException:
        """A timeout while reading the body after the call's deadline: the call's ``DeadlineExceeded``."""
        if time.monotonic() < call.deadline - 0.001:
            return exc  # an ordinary read timeout, before the deadline
        final = lib.localize(call.deadline_exceeded("the response body did not arrive within the deadline"))
        final.__cause__ = exc
        return final

    class TrackedStream(lib.SyncByteStream):  # type: ignore[name-defined,misc]
        """Holds the attempt's lease until the response body is closed (or the response is dropped unclosed).

        Each read of the body is bounded by the call's deadline (:mod:`meshlib._bounded`): the application may
        read it later, in another thread, so the deadline is bound around every chunk.
        """

        __slots__ = ("_call", "_inner", "_lease")

        def __init__(self, inner: Any, lease: Lease, call: Call[Any] | None = None) -> None:
            self._inner = inner
            self._lease = lease
            self._call = call

        def __iter__(self) -> Iterator[bytes]:
            call = self._call
            if call is None or call.deadline == math.inf:
                yield from self._inner
                return
            chunks = iter(self._inner)
            deadline = call.deadline
            while True:
                token = DEADLINE.set(deadline)
                try:
                    chunk = next(chunks)
                except StopIteration:
                    return
                except timeout_error as exc:
                    raise past_deadline(call, exc)  # noqa: B904 - the error itself, or DeadlineExceeded caused by it
                finally:
                    DEADLINE.reset(token)
                yield chunk

        def close(self) -> None:
            try:
                self._inner.close()
            finally:
                self._lease.release()

        def __del__(self) -> None:  # garbage-collected without close(): the lease is released all the same
            lease = self._lease
            if not lease.released:
                lease.drop()

    class AsyncTrackedStream(lib.AsyncByteStream):  # type: ignore[name-defined,misc]
        """The async twin of ``TrackedStream``: one lease released once, on ``aclose()`` or when dropped."""

        __slots__ = ("_call", "_inner", "_lease")

        def __init__(self, inner: Any, lease: Lease, call: Call[Any] | None = None) -> None:
            self._inner = inner
            self._lease = lease
            self._call = call

        async def __aiter__(self) -> AsyncIterator[bytes]:
            call = self._call
            if call is None or call.deadline == math.inf:
                async for chunk in self._inner:
                    yield chunk
                return
            chunks = self._inner.__aiter__()
            deadline = call.deadline
            while True:
                token = DEADLINE.set(deadline)
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    return
                except timeout_error as exc:
                    raise past_deadline(call, exc)  # noqa: B904 - the error itself, or DeadlineExceeded caused by it
                finally:
                    DEADLINE.reset(token)
                yield chunk

        async def aclose(self) -> None:
            try:
                await self._inner.aclose()
            finally:
                self._lease.release()

        def __del__(self) -> None:
            lease = self._lease
            if not lease.released:
                lease.drop()

    return TrackedStream, AsyncTrackedStream


_LOADED: dict[str, HttpLib] = {}


def library(name: str) -> HttpLib:
    """The adapter for ``name`` (``"httpx"`` or ``"httpx2"``), imported and built on first use."""
    found = _LOADED.get(name)
    if found is None:
        if name not in LIBRARIES:
            raise ValueError(f"unknown HTTP library {name!r}: expected one of {', '.join(LIBRARIES)}")
        found = _LOADED.setdefault(name, HttpLib(importlib.import_module(name)))
    return found


def library_of(obj: object) -> HttpLib | None:
    """The library an object (a transport, a request) belongs to, if it is one of the two."""
    root = type(obj).__module__.partition(".")[0]
    return library(root) if root in LIBRARIES else None
