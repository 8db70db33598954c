"""The server half of ORCA over HTTP: report this server's load in the ``endpoint-load-metrics`` response header.

Opt-in: wrap the app and feed a :class:`LoadReporter` (gRFC A51's per-server recorder)::

    reporter = LoadReporter()
    app = ASGILoadReportMiddleware(app, reporter)        # or WSGILoadReportMiddleware(wsgi_app, reporter)
    reporter.set_application_utilization(queue_depth / capacity)   # whenever the application knows it

Every response then carries the report, in the format the request asked for with
``endpoint-load-metrics-format: text|json|bin`` (else ``default_format``, TEXT). ``rps_fractional`` (QPS) and
``eps`` (errors per second: 5xx answers and exceptions) are measured by the middleware over the last ``window``
seconds unless the application sets them. ``only_when_asked=True`` adds the header only to requests that
carry the format header. A mesh client using ``weighted_round_robin`` (:mod:`meshlib.balance.wrr`) weights
this server by ``qps / utilization``: its capacity.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any

from meshlib.balance.orca import (
    FORMAT_HEADER,
    HEADER,
    MAX_METRICS,
    MAX_NAME_LENGTH,
    TEXT_NAME,
    LoadReport,
    ReportFormat,
    format_load_report,
    requested_format,
)

__all__ = ["ASGILoadReportMiddleware", "LoadReporter", "WSGILoadReportMiddleware"]

logger = logging.getLogger("meshlib.server.orca")

Clock = Callable[[], float]
#: The rate window is kept in this many buckets (the oldest one is dropped whole as time passes).
BUCKETS = 10
_FORMAT_HEADER_BYTES = FORMAT_HEADER.encode("ascii")
_WSGI_FORMAT_KEY = "HTTP_" + FORMAT_HEADER.upper().replace("-", "_")


def _check(name: str, value: float, *, upper: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value <= upper):
        bound = "[0, 1]" if upper == 1.0 else "a finite number >= 0"
        raise ValueError(f"{name}={value!r} is invalid: expected {bound}")
    if math.isinf(value):
        raise ValueError(f"{name}={value!r} is invalid: expected a finite number >= 0")
    return float(value)


class LoadReporter:
    """This server's load, as the application sets it plus the request and error rates the middleware measures.

    Thread-safe; values stay until changed or deleted (``None`` clears one). Ranges are A51's: CPU and application
    utilization >= 0 (above 1 when over a soft limit), memory utilization in [0, 1], rates >= 0; named metrics any
    finite number, at most 64, names of letters, digits and ``_.-/``. A bad value raises :class:`ValueError`.
    ``window``: seconds over which QPS and EPS are averaged (default 10); ``clock`` is injectable for tests.
    """

    def __init__(self, *, window: float = 10.0, clock: Clock = time.monotonic) -> None:
        if isinstance(window, bool) or not isinstance(window, (int, float)) or not 0 < window < math.inf:
            raise ValueError(f"LoadReporter window={window!r} is invalid: expected seconds > 0")
        self._lock = threading.Lock()
        self._clock = clock
        self._width = window / BUCKETS
        self._started = clock()
        # bucket slot -> [epoch, requests, errors]
        self._buckets = [[-1, 0, 0] for _ in range(BUCKETS)]
        self._values: dict[str, float] = {}
        self._named: dict[str, float] = {}

    # -- what the application sets (A51's per-server recorder) --

    def _set(self, name: str, value: float | None, upper: float = math.inf) -> None:
        with self._lock:
            if value is None:
                self._values.pop(name, None)
            else:
                self._values[name] = _check(name, value, upper=upper)

    def set_cpu_utilization(self, value: float | None) -> None:
        """CPU utilization (1.0 = the CPU the server may use); ``None`` clears it."""
        self._set("cpu_utilization", value)

    def set_mem_utilization(self, value: float | None) -> None:
        """Memory utilization in [0, 1]; ``None`` clears it."""
        self._set("mem_utilization", value, 1.0)

    def set_application_utilization(self, value: float | None) -> None:
        """Application-defined utilization (what A58 weighs by, before CPU); ``None`` clears it."""
        self._set("application_utilization", value)

    def set_qps(self, value: float | None) -> None:
        """Report this QPS instead of the measured one; ``None`` goes back to measuring."""
        self._set("rps_fractional", value)

    def set_eps(self, value: float | None) -> None:
        """Report this error rate instead of the measured one; ``None`` goes back to measuring."""
        self._set("eps", value)

    def set_named_metric(self, name: str, value: float | None) -> None:
        """An opaque named metric (``named_metrics.<name>``); ``None`` deletes it."""
        if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH or TEXT_NAME.fullmatch(name) is None:
            raise ValueError(
                f"named metric name {name!r} is invalid: expected 1 to {MAX_NAME_LENGTH} of letters, digits, _.-/"
            )
        with self._lock:
            if value is None:
                self._named.pop(name, None)
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"named metric {name}={value!r} is invalid: expected a finite number")
            if name not in self._named and len(self._named) >= MAX_METRICS:
                raise ValueError(f"named metric {name!r}: at most {MAX_METRICS} named metrics")
            self._named[name] = float(value)

    # -- what the middleware measures --

    def record(self, *, error: bool = False, now: float | None = None) -> None:
        """Count one answered request (``error``: a 5xx or an exception) at ``now`` (default: the clock)."""
        now = self._clock() if now is None else now
        epoch = int(now // self._width)
        with self._lock:
            bucket = self._buckets[epoch % BUCKETS]
            if bucket[0] != epoch:
                bucket[0], bucket[1], bucket[2] = epoch, 0, 0
            bucket[1] += 1
            if error:
                bucket[2] += 1

    def rates(self, now: float | None = None) -> tuple[float, float]:
        """``(qps, eps)`` measured over the window up to ``now`` (over the time since start while it is shorter)."""
        now = self._clock() if now is None else now
        epoch = int(now // self._width)
        requests = errors = 0
        with self._lock:
            for first, count, failed in self._buckets:
                if epoch - BUCKETS < first <= epoch:
                    requests += count
                    errors += failed
        span = min(BUCKETS * self._width, max(now - self._started, self._width))
        return requests / span, errors / span

    def report(self, now: float | None = None) -> LoadReport:
        """The report to send now: what the application set, QPS and EPS measured unless it set them."""
        qps, eps = self.rates(now)
        with self._lock:
            values = dict(self._values)
            named = dict(self._named)
        values.setdefault("rps_fractional", qps)
        values.setdefault("eps", eps)
        return LoadReport(**values, named_metrics=named)  # type: ignore[arg-type]

    def header_value(self, asked: str | None, default: ReportFormat = ReportFormat.TEXT) -> str:
        """The ``endpoint-load-metrics`` value in the format ``asked`` names (``default`` if none or unknown)."""
        return format_load_report(self.report(), requested_format(asked, default))


ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]
]


class ASGILoadReportMiddleware:
    """ASGI: count each HTTP request in ``reporter`` and add its report to the response headers.

    ``default_format``: the format when the request names none; ``only_when_asked``: add the header only when the
    request carries ``endpoint-load-metrics-format``. Lifespan and websocket traffic pass through untouched.
    """

    def __init__(
        self,
        app: ASGIApp,
        reporter: LoadReporter,
        *,
        default_format: ReportFormat = ReportFormat.TEXT,
        only_when_asked: bool = False,
    ) -> None:
        self.app = app
        self.reporter = reporter
        self.default_format = default_format
        self.only_when_asked = only_when_asked

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        asked: str | None = None
        for name, value in scope.get("headers", ()):
            if name.lower() == _FORMAT_HEADER_BYTES:
                asked = value.decode("latin-1")
                break
        reporter = self.reporter
        started = False

        async def send_with_report(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                reporter.record(error=int(message["status"]) >= 500)
                if asked is not None or not self.only_when_asked:
                    value = reporter.header_value(asked, self.default_format)
                    message = {
                        **message,
                        "headers": [*message.get("headers", ()), (b"endpoint-load-metrics", value.encode("ascii"))],
                    }
            await send(message)

        try:
            await self.app(scope, receive, send_with_report)
        except BaseException:
            if not started:
                reporter.record(error=True)
            raise


class WSGILoadReportMiddleware:
    """WSGI: count each request in ``reporter`` and add its report to the response headers (as the ASGI one)."""

    def __init__(
        self,
        app: Callable[..., Iterable[bytes]],
        reporter: LoadReporter,
        *,
        default_format: ReportFormat = ReportFormat.TEXT,
        only_when_asked: bool = False,
    ) -> None:
        self.app = app
        self.reporter = reporter
        self.default_format = default_format
        self.only_when_asked = only_when_asked

    def __call__(self, environ: Mapping[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        asked = environ.get(_WSGI_FORMAT_KEY)
        reporter = self.reporter
        started = False

        def start_with_report(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            nonlocal started
            if not started:
                started = True
                try:
                    code = int(status.split(" ", 1)[0])
                except ValueError:
                    code = 500
                reporter.record(error=code >= 500)
            if asked is not None or not self.only_when_asked:
                headers = [*headers, (HEADER, reporter.header_value(asked, self.default_format))]
            return (
                start_response(status, headers, exc_info) if exc_info is not None else start_response(status, headers)
            )

        try:
            return self.app(environ, start_with_report)
        except BaseException:
            if not started:
                reporter.record(error=True)
            raise
