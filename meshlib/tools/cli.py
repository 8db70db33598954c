"""The ``meshlib`` command: ``meshlib demo``, ``resolve <service>``, ``status``, ``explain``, ``authz``,
``--version``.

``demo`` shows balancing, retries, circuit breakers and outlier ejection on real loopback backends (see
:mod:`meshlib.tools.demo`). ``resolve`` answers "what would my application's client see for this service?":
it builds ``meshlib.Client()`` from the same ``MESHLIB_*`` environment the application reads (so every setting
is validated as the application's client would validate it), takes the service's balancer and discovery
source from ``client.mesh_status()``, and asks that discovery source once (:func:`meshlib.discovery.build_resolver`
with the client's settings), so a typo in a variable or an unreachable DNS server shows up before deploying.
``status`` prints the live mesh of a running process that opted in to the loopback admin endpoint
(``MESHLIB_ADMIN_ADDR``, :mod:`meshlib.admin`): it reads the endpoint's ``/status`` JSON over HTTP and prints it
with :func:`meshlib.status.format_status`. Whatever answers on that port is not trusted: the answer is read up to
:data:`MAX_STATUS_BYTES` within :data:`STATUS_TIMEOUT` seconds, must be HTTP 200 with JSON of the shape
:func:`meshlib.status.check_status` expects, and everything printed from it is escaped and bounded
(:func:`meshlib.status.printable`); anything else is one line on stderr naming the address and what was
expected, exit code 1. ``explain`` prints :meth:`meshlib.Client.explain` for a request (nothing sent), after
starting discovery of the backends the winning rule can pick and waiting up to ``--wait`` seconds for their
first answers (:func:`meshlib.routing.explain.wait_for_discovery`, the first-use path a call takes). ``authz``
validates an Istio ``AuthorizationPolicy`` file as the inbound middleware would and, given a request (method,
path, the caller's SPIFFE ID, address, port, headers), prints the decision it would make.
Configuration problems are reported as one line on stderr with exit code 2 (the usual "usage error" code),
never as a traceback.

Like everything in :mod:`meshlib.tools`, this module uses meshlib's public API only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

import meshlib
from meshlib.discovery import DiscoverySettings, Resolution, build_resolver
from meshlib.errors import DiscoveryError  # the library-neutral kind: discovery raises it, whichever HTTP library
from meshlib.routing.explain import wait_for_discovery
from meshlib.status import ServiceStatus, StatusFormatError, check_status, format_status, printable
from meshlib.tools.demo import DemoOptions, run_demo

EXIT_OK = 0
#: Discovery could not answer (DNS down, ...): the configuration is fine, the world is not.
EXIT_DISCOVERY_FAILED = 1
#: Bad usage or configuration: unknown service, invalid ``MESHLIB_*`` value.
EXIT_USAGE = 2
#: ``meshlib status`` could not reach the admin endpoint, or what answered there is not one.
EXIT_UNREACHABLE = 1
#: Largest ``/status`` answer ``meshlib status`` reads (a process with thousands of endpoints answers a few MiB).
MAX_STATUS_BYTES = 16 * 1024 * 1024
#: Seconds ``meshlib status`` gives the admin endpoint to answer in full.
STATUS_TIMEOUT = 10.0
#: Where ``meshlib status`` looks when neither ``--addr`` nor ``MESHLIB_ADMIN_ADDR`` says (Envoy's admin port).
DEFAULT_ADMIN_ADDR = "127.0.0.1:9901"
#: The variable that names a service's discovery target is this prefix and the service's ``<NAME>``.
SERVICE_VARIABLE_PREFIX = "MESHLIB_SERVICE_"
ADMIN_ADDR_VARIABLE = "MESHLIB_ADMIN_ADDR"
#: ``meshlib authz``'s default policies file.
AUTHZ_FILE_VARIABLE = "MESHLIB_AUTHZ_FILE"
#: ``meshlib authz`` with a request the policies deny.
EXIT_DENIED = 1
#: Largest policies file ``meshlib authz`` reads (the parser refuses more than 4 MiB itself).
MAX_AUTHZ_BYTES = 8 * 1024 * 1024
#: Seconds ``meshlib explain`` waits for discovery's first answers by default, and at most.
DEFAULT_EXPLAIN_WAIT = 2.0
MAX_EXPLAIN_WAIT = 60.0


class UsageError(Exception):
    """A problem the user fixes by changing the command line or the environment (exit code 2)."""


def _positive_int(raw: str) -> int:
    """argparse type for counts that must be at least 1."""
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {raw!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subcommand per task, each with its own handler in ``handler``."""
    parser = argparse.ArgumentParser(prog="meshlib", description="A sidecarless service mesh for Python.")
    parser.add_argument("--version", action="version", version=f"meshlib {meshlib.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="compare p2c_ewma and round_robin on loopback backends (one slow, one failing), with retries, "
        "breakers and outlier ejection at work; then a 90/10 -> 50/50 traffic split by a routes file",
        description="Start 5 loopback backends (3 healthy, 1 slow, 1 failing with 503) and send the same "
        "requests through meshlib.Client balanced by p2c_ewma, then by round_robin, each with a fresh client and "
        "the mesh's default resilience settings (MESHLIB_* mesh settings are ignored; MESHLIB_HTTP_LIBRARY picks "
        "httpx or httpx2). Shows per endpoint the "
        "attempts, latency, errors, breaker state and ejection; per balancer what callers saw and the retries. "
        "Then a Gateway API routes file splits the service 90/10 between two versions, edited to 50/50 while "
        "callers send: the share each backend got per version of the file. Last, hedging: a service whose "
        "backends stall on some requests, called without and with a p95 hedge policy (p50/p99, hedges, extra load).",
    )
    defaults = DemoOptions()
    demo.add_argument(
        "--requests", type=_positive_int, default=defaults.requests, metavar="N", help="requests per balancer"
    )
    demo.add_argument(
        "--concurrency", type=_positive_int, default=defaults.concurrency, metavar="C", help="concurrent callers"
    )
    demo.add_argument("--no-live", action="store_true", help="print each table once instead of redrawing it")
    demo.set_defaults(handler=run_demo_command)

    resolve = commands.add_parser(
        "resolve",
        help="print the endpoints discovery returns for a service, configured from MESHLIB_* variables",
        description="Build meshlib.Client() from the environment and ask the service's discovery source once.",
    )
    resolve.add_argument("service", metavar="SERVICE-HOST", help="the host a request would name, e.g. payments")
    resolve.set_defaults(handler=run_resolve_command)

    status = commands.add_parser(
        "status",
        help="print the live mesh of a running process (its MESHLIB_ADMIN_ADDR admin endpoint)",
        description="Ask a running process's loopback admin endpoint for /status and print it as a table: "
        "services, endpoints, EWMA latency, in-flight, breakers, ejections, discovery and retry budget.",
    )
    status.add_argument(
        "--addr",
        metavar="HOST:PORT",
        help=f"the admin endpoint (default: $MESHLIB_ADMIN_ADDR, else {DEFAULT_ADMIN_ADDR}); loopback only",
    )
    status.add_argument("--json", action="store_true", help="print the JSON the endpoint answered")
    status.set_defaults(handler=run_status_command)

    explain = commands.add_parser(
        "explain",
        help="print how a request would be routed: rule matched and why the others did not, filters, backends "
        "with weights and endpoints, effective policy",
        description="Build meshlib.Client() from the MESHLIB_* environment, start discovery of the backends the "
        "winning rule can pick (waiting up to --wait seconds for their first answers), and print what the client "
        "would do with the request. Nothing is sent.",
    )
    explain.add_argument("method", metavar="METHOD", help="the request method, e.g. POST")
    explain.add_argument("url", metavar="URL", help="the URL the application calls, e.g. http://payments/charge")
    _add_header_option(explain, "a request header (repeatable)")
    explain.add_argument("--json", action="store_true", help="print the explanation as JSON")
    explain.add_argument(
        "--wait",
        type=_wait_seconds,
        default=DEFAULT_EXPLAIN_WAIT,
        metavar="SECONDS",
        help=f"how long to wait for discovery's first answers (default {DEFAULT_EXPLAIN_WAIT:g})",
    )
    explain.set_defaults(handler=run_explain_command)

    authz = commands.add_parser(
        "authz",
        help="validate an Istio AuthorizationPolicy file (MESHLIB_AUTHZ_FILE) and decide a request with it",
        description="Load the policies file as the inbound middleware would (same validation, same errors) and "
        "list its policies; with METHOD and PATH, print the decision the middleware would make for that request: "
        "allow or deny (403), the deciding policy and rule, and any AUDIT match. Exit code 0 when the request is "
        f"allowed (or no request is given), {EXIT_DENIED} when it is denied, {EXIT_USAGE} for a bad file or usage.",
    )
    authz.add_argument("method", nargs="?", metavar="METHOD", help="the request method, e.g. POST")
    authz.add_argument("path", nargs="?", metavar="PATH", help="the request path, e.g. /charge (a query is ignored)")
    authz.add_argument("--file", metavar="FILE", help="the policies file (default: $MESHLIB_AUTHZ_FILE)")
    authz.add_argument(
        "--peer", metavar="SPIFFE-ID", help="the caller's verified identity (omit it for a caller without one)"
    )
    authz.add_argument("--ip", metavar="ADDRESS", help="the caller's IP address (for ipBlocks)")
    authz.add_argument("--port", type=_port, metavar="PORT", help="the local port the request arrives on")
    _add_header_option(authz, "a request header (repeatable; repeated names are joined with ',' as Envoy does)")
    authz.add_argument("--json", action="store_true", help="print the result as JSON")
    authz.set_defaults(handler=run_authz_command)
    return parser


def _add_header_option(command: argparse.ArgumentParser, help: str) -> None:
    """``-H 'NAME: VALUE'`` (curl's spelling), repeatable, into ``args.headers``."""
    command.add_argument(
        "-H", "--header", action="append", default=[], dest="headers", metavar="'NAME: VALUE'", help=help
    )


def _port(raw: str) -> int:
    """argparse type for a TCP port."""
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {raw!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {value}")
    return value


def run_authz_command(args: argparse.Namespace) -> int:
    """``meshlib authz [METHOD PATH]``: validate the policies file; decide one request with it."""
    from meshlib.security.authz import AuthzRequest, header_map, parse_policies

    path_arg: str | None = args.file or os.environ.get(AUTHZ_FILE_VARIABLE, "").strip() or None
    if path_arg is None:
        raise UsageError(f"no policies file: pass --file FILE or set {AUTHZ_FILE_VARIABLE}")
    if (args.method is None) != (args.path is None):
        raise UsageError("give both METHOD and PATH, or neither (to only validate the file)")
    try:
        with open(path_arg, "rb") as file:
            data = file.read(MAX_AUTHZ_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"{printable(path_arg, 200)}: cannot read it: {printable(exc.strerror or exc, 200)}") from None
    policies = parse_policies(data, source=path_arg)  # a bad file is a ConfigError: exit 2, one line
    listed = [{"name": p.name, "action": p.action, "rules": len(p.rules)} for p in policies.policies]
    result: dict[str, object] = {"file": path_arg, "policies": listed}
    decision = None
    if args.method is not None:
        method: str = args.method
        if not method or not all(c in _TOKEN for c in method):
            raise UsageError(f"METHOD {printable(method, 40)!r}: expected an HTTP method such as GET or POST")
        request_path: str = args.path.partition("?")[0]
        if not request_path.startswith("/") or any(c in request_path for c in "\r\n\x00"):
            raise UsageError(f"PATH {printable(args.path, 200)!r}: expected an absolute path such as /charge")
        peer: str | None = args.peer
        if peer is not None and not peer.startswith("spiffe://"):
            raise UsageError(f"--peer {printable(peer, 200)!r}: expected a SPIFFE ID (spiffe://trust-domain/path)")
        headers = header_map(parse_header(raw) for raw in args.headers)
        decision = policies.evaluate(AuthzRequest(peer, args.ip, method, request_path, args.port, headers))
        result["request"] = {"method": method, "path": request_path, "peer": peer, "ip": args.ip, "port": args.port}
        result["decision"] = {
            "allowed": decision.allowed,
            "status": 200 if decision.allowed else 403,
            "policy": decision.policy,
            "action": decision.action,
            "rule": decision.rule,
            "reason": decision.reason,
            "audit_policy": decision.audit_policy if decision.audit else None,
        }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        counts = {action: sum(1 for p in listed if p["action"] == action) for action in ("DENY", "ALLOW", "AUDIT")}
        print(
            f"{printable(path_arg, 200)}: {len(listed)} "
            f"{'policy' if len(listed) == 1 else 'policies'} "
            f"({counts['DENY']} DENY, {counts['ALLOW']} ALLOW, {counts['AUDIT']} AUDIT)"
        )
        for entry in listed:
            rules = entry["rules"]
            noun = "rule" if rules == 1 else "rules"
            print(f"  {entry['action']:<6} {printable(entry['name'], 200)}  {rules} {noun}")
        if decision is not None:
            verdict = "ALLOW (the app runs)" if decision.allowed else "DENY (403 RBAC: access denied)"
            print(f"{printable(args.method, 40)} {printable(args.path.partition('?')[0], 200)}: {verdict}")
            where = "" if decision.rule is None else f", rule {decision.rule}"
            print(f"  {printable(decision.reason, 300)}{where}")
            if decision.audit:
                print(f"  audited by {printable(decision.audit_policy, 200)}")
    return EXIT_OK if decision is None or decision.allowed else EXIT_DENIED


def _wait_seconds(raw: str) -> float:
    """argparse type for ``--wait``: seconds from 0 to :data:`MAX_EXPLAIN_WAIT`."""
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {raw!r}") from None
    if not 0.0 <= value <= MAX_EXPLAIN_WAIT:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"expected seconds from 0 to {MAX_EXPLAIN_WAIT:g}, got {raw!r}")
    return value


def parse_header(raw: str) -> tuple[str, str]:
    """``-H 'name: value'`` as curl writes it: a :class:`UsageError` naming the argument unless the name is an
    HTTP token and the value has no line break."""
    name, colon, value = raw.partition(":")
    name = name.strip()
    value = value.strip()
    if not colon or not name or not all(c in _TOKEN for c in name) or any(c in value for c in "\r\n\x00"):
        raise UsageError(f"-H {printable(raw, 200)!r}: expected 'NAME: VALUE', NAME an HTTP header name")
    return name, value


_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def run_explain_command(args: argparse.Namespace) -> int:
    """``meshlib explain METHOD URL``: print :meth:`meshlib.Client.explain` after discovery had a chance to answer."""
    headers = [parse_header(raw) for raw in args.headers]
    method: str = args.method
    if not method or not all(c in _TOKEN for c in method):
        raise UsageError(f"METHOD {printable(method, 40)!r}: expected an HTTP method such as GET or POST")
    # What meshlib.Client() reads: the process's MESHLIB_* variables, validated as the application's client would.
    with meshlib.Client(config=meshlib.MeshConfig.from_env(), inner_transport="httpx") as client:
        try:
            request = client.build_request(method.upper(), args.url, headers=headers)
        except Exception as exc:  # httpx.InvalidURL, UnsupportedProtocol...: the library's words for a bad URL
            raise UsageError(f"URL {printable(args.url, 200)!r}: {printable(exc, 200)}") from None
        explanation = client.explain(request)
        if explanation.local is None:
            names = [b.service for b in explanation.backends if b.configured and b.weight > 0 and not b.invalid]
            wait_for_discovery(client, [n for n in names if n is not None], args.wait)
            explanation = client.explain(request)
    print(json.dumps(explanation.to_dict(), indent=2) if args.json else explanation.text())
    return EXIT_OK


def run_demo_command(args: argparse.Namespace) -> int:
    """``meshlib demo``: run :func:`meshlib.tools.demo.run_demo` with the command-line options."""
    run_demo(DemoOptions(requests=args.requests, concurrency=args.concurrency, live=not args.no_live))
    return EXIT_OK


def run_resolve_command(args: argparse.Namespace) -> int:
    """``meshlib resolve HOST``: print the service's discovery answer, one endpoint per line."""
    host: str = args.service
    config = meshlib.MeshConfig.from_env()  # what meshlib.Client() reads: the process's MESHLIB_* variables
    # The client validates everything the application's would (targets, TLS files, the HTTP library...).
    with meshlib.Client(config=config, inner_transport="httpx") as client:  # resolving needs no endpoint pools
        service = config.service(host)
        if service is None:
            known = ", ".join(sorted(s.name for s in config.services.values())) or "none"
            variable = service_variable(host)
            raise UsageError(f"unknown service {host!r}: {variable} is not set (configured services: {known})")
        status = _service_status(client.mesh_status(), service.name)
        resolution = resolve_once(config, service)
        print(f"{status.name}: {len(resolution.endpoints)} endpoint(s) from {status.discovery.source}")
        print(f"  balancer {status.balancer}, {_describe_ttl(resolution)}")
        for endpoint in resolution.endpoints:
            print(f"  {_describe_endpoint(endpoint)}")
    return EXIT_OK


def service_variable(host: str) -> str:
    """``MESHLIB_SERVICE_<NAME>`` for a request host: ``<NAME>`` is the host upper-cased with ``-`` and ``.``
    written as ``_`` (the rule docs/configuration.md states: ``user-api`` -> ``MESHLIB_SERVICE_USER_API``)."""
    return SERVICE_VARIABLE_PREFIX + host.upper().replace("-", "_").replace(".", "_")


def _service_status(status: meshlib.MeshStatus, name: str) -> ServiceStatus:
    """The client's view of service ``name`` in a ``mesh_status()`` snapshot (every configured service is in it)."""
    for service in status.services:
        if service.name == name:
            return service
    raise LookupError(f"mesh_status() has no service {name!r}")  # a configured service always appears


def resolve_once(config: meshlib.MeshConfig, service: meshlib.ServiceConfig) -> Resolution:
    """Ask ``service``'s discovery source once, with the discovery settings a client built from ``config`` uses."""
    settings = DiscoverySettings(dns_servers=config.dns_servers, dns_timeout=config.dns_timeout, environ=config.environ)
    variable = service.variable or f"services[{service.name!r}]"
    resolver = build_resolver(service.name, service.target, settings, variable=variable)
    try:
        return resolver.resolve()
    finally:
        resolver.close()


def admin_address(name: str, raw: str) -> tuple[str, int]:
    """``raw`` read as ``MESHLIB_ADMIN_ADDR`` is (loopback ``ip:port`` only); a :class:`meshlib.ConfigError` names
    ``name`` (``--addr``, the variable, or ``default``)."""
    try:
        address = meshlib.MeshConfig.from_env({ADMIN_ADDR_VARIABLE: raw}).admin_addr
    except meshlib.ConfigError as error:
        raise meshlib.ConfigError(name, raw, error.expected) from None
    if address is None:  # blank
        expected = "a loopback address and port such as 127.0.0.1:9901 or [::1]:9901"
        raise meshlib.ConfigError(name, raw, f"{expected} (the admin endpoint is never served beyond this host)")
    return address


class StatusAnswerError(Exception):
    """What answered on the admin port is not meshlib's admin endpoint (or not a well-formed answer from one)."""


def fetch_status(address: tuple[str, int], timeout: float = STATUS_TIMEOUT) -> object:
    """``GET /status`` from the admin endpoint at ``address``: its decoded JSON, not checked yet (no proxy: the
    endpoint is on this host).

    :class:`OSError` when nothing answers; :class:`StatusAnswerError` (a printable one-line reason) when something
    answers with anything but HTTP 200 and JSON, more than :data:`MAX_STATUS_BYTES`, or not within ``timeout``.
    """
    host, port = address
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{_host_port(host, port)}/status", timeout=timeout) as answer:
            body = _read_bounded(answer, deadline)
    except urllib.error.HTTPError as error:
        error.close()
        reason = f" {printable(error.reason, 80)}" if error.reason else ""
        raise StatusAnswerError(f"answered HTTP {error.code}{reason}, expected 200 with /status JSON") from None
    except http.client.HTTPException as error:  # BadStatusLine, IncompleteRead...: not HTTP, or cut short
        raise StatusAnswerError(f"did not answer well-formed HTTP ({printable(error, 80)})") from None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, a number too long, nesting too deep
        preview = printable(body[:40].decode("utf-8", "replace"), 40)
        raise StatusAnswerError(f"answered {len(body)} bytes that are not JSON (starting '{preview}')") from None


def _read_bounded(answer: http.client.HTTPResponse, deadline: float) -> bytes:
    """The body of ``answer``, refused beyond :data:`MAX_STATUS_BYTES` or past ``deadline``."""
    chunks: list[bytes] = []
    size = 0
    while chunk := answer.read(64 * 1024):
        size += len(chunk)
        if size > MAX_STATUS_BYTES:
            raise StatusAnswerError(f"answered more than {MAX_STATUS_BYTES // (1024 * 1024)} MiB")
        if time.monotonic() > deadline:
            raise StatusAnswerError("did not finish answering in time")
        chunks.append(chunk)
    return b"".join(chunks)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run_status_command(args: argparse.Namespace) -> int:
    """``meshlib status``: fetch ``/status`` from the admin endpoint and print it."""
    if args.addr:
        address = admin_address("--addr", args.addr)
    else:
        raw = os.environ.get(ADMIN_ADDR_VARIABLE, "").strip()
        address = admin_address(ADMIN_ADDR_VARIABLE if raw else "default", raw or DEFAULT_ADMIN_ADDR)
    where = _host_port(*address)
    url = f"http://{where}/status"
    try:
        payload = check_status(fetch_status(address))
    except StatusAnswerError as exc:
        print(f"meshlib: {url} is not a meshlib admin endpoint: it {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except StatusFormatError as exc:
        print(f"meshlib: {url} answered JSON that is not meshlib's /status: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except OSError as exc:
        print(
            f"meshlib: no admin endpoint answered at {url} ({printable(exc, 200)}); start the process with "
            f"MESHLIB_ADMIN_ADDR={where} (or pass --addr)",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    # --json: json.dumps escapes every control and non-ASCII character (ensure_ascii), so it is safe as it is.
    print(json.dumps(payload, indent=2) if args.json else format_status(payload))
    return EXIT_OK


def _describe_ttl(resolution: Resolution) -> str:
    """How long the answer may be cached, in words."""
    if resolution.watch:
        return "watched (updates pushed)"
    if resolution.ttl is None:
        return "never expires"
    return f"ttl {resolution.ttl:g} s"


def _describe_endpoint(endpoint: meshlib.Endpoint) -> str:
    """``host:port`` followed by the attributes that differ from their defaults."""
    parts = [endpoint.address, f"weight={endpoint.weight}"]
    if endpoint.priority:
        parts.append(f"priority={endpoint.priority}")
    if endpoint.zone:
        parts.append(f"zone={endpoint.zone}")
    if endpoint.tags:
        parts.append("tags=" + ",".join(endpoint.tags))
    return "  ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``meshlib`` console script; returns the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, bad usage: argparse has printed; return its code
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code: int = args.handler(args)
    except (meshlib.ConfigError, UsageError) as exc:
        print(f"meshlib: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DiscoveryError as exc:
        print(f"meshlib: discovery failed: {exc}", file=sys.stderr)
        return EXIT_DISCOVERY_FAILED
    except KeyboardInterrupt:
        print("meshlib: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
