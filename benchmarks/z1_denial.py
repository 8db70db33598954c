"""Z1 -- what authorization adds per request: the inbound middleware denying, allowing and without authz.

Issue 12's target: *the denial path adds at most 20 µs per request*. Measured in-process, no server: the ASGI
middleware (:class:`~meshlib.server.middleware.ASGIInboundMiddleware`) is awaited directly with a fresh copy of a
realistic ASGI ``scope`` (8 request headers, client and server addresses) and no-op ``receive``/``send``, and the
WSGI middleware (:class:`~meshlib.server.middleware.WSGIInboundMiddleware`) is called with a fresh ``environ``,
its body iterated and closed as a WSGI server does. Every variant runs
:class:`~meshlib.server.middleware.PeerIdentityHook` with a resolver (the caller's SPIFFE ID read from a header
and parsed, so the identity is known and the policies see a principal):

* ``app alone``  the application called without the middleware (context only: what the middleware costs)
* ``baseline``   middleware + peer identity, no authz; the app answers 200 at once
* ``deny (DENY policy)``  + :class:`~meshlib.server.authz.AuthorizationHook`; the caller is named by the *last*
  DENY policy: 403 through :class:`~meshlib.server.middleware.Refusal`, the app never runs
* ``deny (no ALLOW matched)``  the caller matches no policy: every DENY and every ALLOW policy is tried, then 403
  (the denial path's worst case)
* ``allow (last ALLOW)``  the request matches only the *last* ALLOW policy (every DENY and ALLOW tried); the app
  answers 200

The policy set is 2 DENY + 5 ALLOW ``AuthorizationPolicy`` documents (principals with ``*``, namespaces, paths,
methods, ports), parsed by :func:`~meshlib.security.authz.parse_policies`. Every variant's status (and whether
the app ran) is checked before timing. Each repeat times ``requests`` back-to-back requests per variant with
``time.perf_counter_ns``, variants interleaved and the order rotating each repeat; reported: the best repeat
(least disturbed by other work) and the median, in µs per request, and the added cost = best(variant) -
best(baseline). One thread, one core; the event loop runs but never waits (nothing suspends).

``python -m benchmarks z1`` or ``python -m benchmarks.z1_denial [--requests N] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable, Iterable, MutableMapping
from pathlib import Path
from typing import Any

from benchmarks.harness import Check, Context, ScenarioResult, render_result
from benchmarks.report import bar_chart
from meshlib.security.authz import AuthzRequest, PolicySet, header_map, parse_policies
from meshlib.server.authz import AuthorizationHook
from meshlib.server.middleware import (
    ASGIInboundMiddleware,
    PeerIdentityHook,
    WSGIInboundMiddleware,
    _ASGIRequest,
    _WSGIRequest,
)

TARGET_US = 20.0
PROTOCOLS = ("asgi", "wsgi")
VARIANTS = ("app alone", "baseline", "deny (DENY policy)", "deny (no ALLOW matched)", "allow (last ALLOW)")
EXPECTED = {v: 200 for v in VARIANTS} | {"deny (DENY policy)": 403, "deny (no ALLOW matched)": 403}
IDENTITY_HEADER = "x-forwarded-client-spiffe-id"

POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: shop}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin/*", "/debug/*"]}}]
  - from: [{source: {namespaces: ["dev", "test-*"]}}]
    to: [{operation: {methods: ["POST", "PUT", "DELETE"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-blocked, namespace: shop}
spec:
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/blocked", "cluster.local/ns/legacy/*"]}}]
"""
POLICIES += "".join(
    f"""---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-team{index}, namespace: shop}}
spec:
  action: ALLOW
  rules:
  - from:
    - source: {{principals: ["cluster.local/ns/team{index}/sa/*"]}}
    to: [{{operation: {{methods: ["GET", "POST"], paths: ["/api/v{index}/*"], ports: ["8080"]}}}}]
"""
    for index in range(5)
)

#: The caller of each variant (the SPIFFE ID its identity header carries) and the path it asks for.
CALLERS = {
    "app alone": "spiffe://cluster.local/ns/team4/sa/web",
    "baseline": "spiffe://cluster.local/ns/team4/sa/web",
    "deny (DENY policy)": "spiffe://cluster.local/ns/shop/sa/blocked",
    "deny (no ALLOW matched)": "spiffe://cluster.local/ns/other/sa/web",
    "allow (last ALLOW)": "spiffe://cluster.local/ns/team4/sa/web",
}
PATH = "/api/v4/items"
HEADERS = (
    ("host", "shop.shop.svc.cluster.local:8080"),
    ("user-agent", "python-httpx/0.28.1"),
    ("accept", "application/json"),
    ("accept-encoding", "gzip, deflate"),
    ("connection", "keep-alive"),
    ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ("x-request-id", "7d4f9c1e-2b1a-4b8e-9a53-0c3b8f2d6e11"),
)

_START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
_BODY = {"type": "http.response.body", "body": b"ok"}


class _Counter:
    """How many times the app ran (checked once per variant before timing)."""

    def __init__(self) -> None:
        self.ran = 0


def _asgi_app(counter: _Counter) -> Callable[..., Any]:
    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        counter.ran += 1
        await send(_START)
        await send(_BODY)

    return app


def _wsgi_app(counter: _Counter) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        counter.ran += 1
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    return app


def _resolver(request: Any) -> str | None:
    """The caller's SPIFFE ID from a header (as a trusted proxy would forward it); parsed by the hook."""
    value: str | None = request.header(IDENTITY_HEADER)
    return value


def _hooks(variant: str, policies: PolicySet) -> list[Any]:
    hooks: list[Any] = [PeerIdentityHook(resolve=_resolver)]
    if variant not in ("app alone", "baseline"):
        hooks.append(AuthorizationHook(policies))
    return hooks


def _scope(caller: str) -> dict[str, Any]:
    headers = [(k.encode(), v.encode()) for k, v in HEADERS] + [(IDENTITY_HEADER.encode(), caller.encode())]
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "scheme": "http",
        "method": "GET",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("10.4.0.7", 51234),
        "server": ("10.4.0.2", 8080),
        "state": {},
    }


def _environ(caller: str) -> dict[str, Any]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": PATH,
        "QUERY_STRING": "",
        "SERVER_NAME": "10.4.0.2",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "10.4.0.7",
        "REMOTE_PORT": "51234",
        "wsgi.url_scheme": "http",
        "wsgi.version": (1, 0),
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for name, value in (*HEADERS, (IDENTITY_HEADER, caller)):
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    return environ


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: MutableMapping[str, Any]) -> None:
    return None


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
    return _write


def _write(data: bytes) -> None:
    return None


class _Variant:
    """One protocol x variant: the callable under test, its request, and a timer of ``n`` requests."""

    def __init__(self, protocol: str, variant: str, policies: PolicySet) -> None:
        self.protocol = protocol
        self.variant = variant
        self.counter = _Counter()
        caller = CALLERS[variant]
        if protocol == "asgi":
            app = _asgi_app(self.counter)
            self.asgi = app if variant == "app alone" else ASGIInboundMiddleware(app, hooks=_hooks(variant, policies))
            self.request: dict[str, Any] = _scope(caller)
        else:
            wsgi = _wsgi_app(self.counter)
            self.wsgi = wsgi if variant == "app alone" else WSGIInboundMiddleware(wsgi, hooks=_hooks(variant, policies))
            self.request = _environ(caller)

    def check(self, loop: asyncio.AbstractEventLoop) -> None:
        """Send one request with a recording ``send``/``start_response``: the status and app run as expected."""
        statuses: list[int] = []
        before = self.counter.ran
        if self.protocol == "asgi":

            async def send(message: MutableMapping[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    statuses.append(int(message["status"]))

            loop.run_until_complete(self.asgi(dict(self.request), _receive, send))
        else:

            def start_response(status: str, headers: Any, exc_info: Any = None) -> Callable[[bytes], None]:
                statuses.append(int(status.split(maxsplit=1)[0]))
                return _write

            body = self.wsgi(dict(self.request), start_response)
            b"".join(body)
            getattr(body, "close", lambda: None)()
        want = EXPECTED[self.variant]
        ran = self.counter.ran - before
        if statuses != [want] or ran != (0 if want == 403 else 1):
            raise RuntimeError(f"{self.protocol} {self.variant}: statuses {statuses}, app ran {ran}x; expected {want}")

    def time_ns(self, loop: asyncio.AbstractEventLoop, n: int) -> int:
        """Nanoseconds for ``n`` requests back to back (a fresh scope/environ each, as a server makes)."""
        request = self.request
        if self.protocol == "asgi":
            app = self.asgi

            async def run() -> int:
                start = time.perf_counter_ns()
                for _ in range(n):
                    await app(dict(request), _receive, _send)
                return time.perf_counter_ns() - start

            return loop.run_until_complete(run())
        wsgi = self.wsgi
        start = time.perf_counter_ns()
        for _ in range(n):
            body = wsgi(dict(request), _start_response)
            for _chunk in body:
                pass
            close = getattr(body, "close", None)
            if close is not None:
                close()
        return time.perf_counter_ns() - start


def _parts(policies: PolicySet) -> dict[str, Callable[[], object]]:
    """Pieces of the authz hook's work, timed alone to show where the added cost goes."""
    asgi, wsgi = _scope(CALLERS["baseline"]), _environ(CALLERS["baseline"])

    def headers(request: Any) -> Any:  # what AuthorizationHook does on every request
        return header_map((name, request.header(name) or "") for name in request.header_names())

    found = headers(_ASGIRequest(asgi))
    parts: dict[str, Callable[[], object]] = {
        "asgi: header map (every header)": lambda: headers(_ASGIRequest(dict(asgi))),
        "wsgi: header map (every header)": lambda: headers(_WSGIRequest(dict(wsgi))),
    }
    for variant in ("deny (DENY policy)", "deny (no ALLOW matched)", "allow (last ALLOW)"):
        request = AuthzRequest(CALLERS[variant], "10.4.0.7", "GET", PATH, 8080, found)
        parts[f"PolicySet.evaluate, {variant}"] = lambda request=request: policies.evaluate(request)  # type: ignore[misc]
    return parts


def _time_part(call: Callable[[], object], n: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(n):
        call()
    return (time.perf_counter_ns() - start) / n / 1e3


def measure(requests: int, repeats: int) -> ScenarioResult:
    """Time every protocol and variant; rows in µs per request, checks against :data:`TARGET_US`."""
    policies = parse_policies(POLICIES, source="benchmarks/z1_denial.py")
    loop = asyncio.new_event_loop()
    try:
        variants = [_Variant(p, v, policies) for p in PROTOCOLS for v in VARIANTS]
        for variant in variants:
            variant.check(loop)
            variant.time_ns(loop, max(1, requests // 10))  # warm-up
        samples: dict[tuple[str, str], list[float]] = {(v.protocol, v.variant): [] for v in variants}
        for r in range(repeats):
            k = r % len(variants)
            for variant in [*variants[k:], *variants[:k]]:
                samples[(variant.protocol, variant.variant)].append(variant.time_ns(loop, requests) / requests / 1e3)
        parts = _parts(policies)
        part_samples = {name: [_time_part(call, requests) for _ in range(repeats)] for name, call in parts.items()}
    finally:
        loop.close()

    rows: list[dict[str, Any]] = []
    checks: list[Check] = []
    series: dict[str, dict[str, float]] = {}
    for protocol in PROTOCOLS:
        base = min(samples[(protocol, "baseline")])
        for variant in VARIANTS:
            runs = samples[(protocol, variant)]
            best = min(runs)
            added = best - base
            rows.append(
                {
                    "protocol": protocol,
                    "variant": variant,
                    "status": EXPECTED[variant],
                    "best_us": best,
                    "median_us": statistics.median(runs),
                    "added_us": added if variant not in ("app alone", "baseline") else float("nan"),
                }
            )
            if variant not in ("app alone", "baseline"):
                series.setdefault(protocol, {})[variant] = added
                checks.append(
                    Check(
                        f"{protocol} {variant}: added per request",
                        f"<= {TARGET_US:.0f} µs",
                        added,
                        added <= TARGET_US,
                        " µs",
                    )
                )
    for name, runs in part_samples.items():
        protocol, _, label = name.partition(": ") if name.startswith(PROTOCOLS) else ("both", "", name)
        row = {"protocol": protocol, "variant": f"part: {label}", "status": "-", "best_us": min(runs)}
        rows.append(row | {"median_us": statistics.median(runs), "added_us": float("nan")})
    notes = [
        f"best and median of {repeats} interleaved repeats of {requests:,} requests per variant "
        "(time.perf_counter_ns, one thread); added_us = best(variant) - best(baseline, same protocol)",
        "every variant runs PeerIdentityHook(resolve=<SPIFFE ID from a header>); policies: 2 DENY + 5 ALLOW; "
        f"request GET {PATH}, {len(HEADERS) + 1} headers, port 8080",
        "part rows: pieces of AuthorizationHook's work timed alone (the header map is built only when a policy has "
        "a `when` on a header; these policies have none, so the hook skips it)",
    ]
    return ScenarioResult(
        "z1",
        "authorization cost per request: inbound middleware denying / allowing vs without authz (in-process)",
        ["protocol", "variant", "status", "best_us", "median_us", "added_us"],
        rows,
        checks,
        notes=notes,
        series=series,
    )


def run(ctx: Context) -> ScenarioResult:
    """The scenario as ``python -m benchmarks z1`` runs it."""
    return measure(int(ctx.scale(2_000, 1_000)), int(ctx.scale(30, 10)) * max(1, ctx.repeats // 3))


def plot(result: ScenarioResult, out: Path) -> list[Path]:
    """Added µs per request of each authz variant, ASGI and WSGI."""
    protocols = list(result.series)
    names = [v for v in VARIANTS if v not in ("app alone", "baseline")]
    values = {v: [float(result.series[p].get(v, float("nan"))) for p in protocols] for v in names}
    path = out / "z1_added_us.png"
    ok = bar_chart(path, f"Z1: µs per request added by authz (target <= {TARGET_US:.0f})", protocols, values, "µs")
    return [path] if ok else []


def main(argv: list[str] | None = None) -> int:
    """Run Z1 alone and print its table and checks (exit status 0 whatever the verdicts)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.z1_denial", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2_000, help="requests per variant per repeat")
    parser.add_argument("--repeats", type=int, default=30, help="interleaved repeats (best and median reported)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.repeats < 1:
        parser.error("--requests and --repeats must be >= 1")
    started = time.perf_counter()
    result = measure(args.requests, args.repeats)
    result.seconds = time.perf_counter() - started
    print(render_result(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
