"""The ``meshlib`` command: ``meshlib demo``, ``meshlib resolve <service>``, ``meshlib status``, ``--version``.

``demo`` shows balancing, retries, circuit breakers and outlier ejection on real loopback backends (see
:mod:`meshlib.demo`). ``resolve`` answers "what
would my application's client see for this service?": it builds ``meshlib.Client()`` from the same
``MESHLIB_*`` environment the application reads and asks that service's discovery source once, so a typo
in a variable or an unreachable DNS server shows up before deploying. ``status`` prints the live mesh of a
running process that opted in to the loopback admin endpoint (``MESHLIB_ADMIN_ADDR``, :mod:`meshlib.admin`):
services, endpoints, EWMA latency, in-flight, breakers, ejections, discovery. Configuration problems are reported
as one line on stderr with exit code 2 (the usual "usage error" code), never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from meshlib import __version__
from meshlib._config import SERVICE_PREFIX, parse_admin_addr, service_key
from meshlib.admin import fetch_status
from meshlib.demo import DemoOptions, run_demo
from meshlib.discovery.base import Endpoint, Resolution
from meshlib.errors import ConfigError, DiscoveryError
from meshlib.httpx import Client
from meshlib.status import format_status

EXIT_OK = 0
#: Discovery could not answer (DNS down, ...): the configuration is fine, the world is not.
EXIT_DISCOVERY_FAILED = 1
#: Bad usage or configuration: unknown service, invalid ``MESHLIB_*`` value.
EXIT_USAGE = 2
#: ``meshlib status`` could not reach the admin endpoint.
EXIT_UNREACHABLE = 1
#: Where ``meshlib status`` looks when neither ``--addr`` nor ``MESHLIB_ADMIN_ADDR`` says (Envoy's admin port).
DEFAULT_ADMIN_ADDR = "127.0.0.1:9901"


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
    parser.add_argument("--version", action="version", version=f"meshlib {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="compare p2c_ewma and round_robin on loopback backends (one slow, one failing), with retries, "
        "breakers and outlier ejection at work",
        description="Start 5 loopback backends (3 healthy, 1 slow, 1 failing with 503) and send the same "
        "requests through meshlib.Client balanced by p2c_ewma, then by round_robin, each with a fresh client and "
        "the mesh's default resilience settings (MESHLIB_* variables are ignored). Shows per endpoint the "
        "attempts, latency, errors, breaker state and ejection; per balancer what callers saw and the retries.",
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
    return parser


def run_demo_command(args: argparse.Namespace) -> int:
    """``meshlib demo``: run :func:`meshlib.demo.run_demo` with the command-line options."""
    run_demo(DemoOptions(requests=args.requests, concurrency=args.concurrency, live=not args.no_live))
    return EXIT_OK


def run_resolve_command(args: argparse.Namespace) -> int:
    """``meshlib resolve HOST``: print the service's discovery answer, one endpoint per line."""
    host: str = args.service
    with Client(inner_transport="httpx") as client:  # resolving needs no endpoint pools, sync or not
        services = client.mesh.services
        service = services.get(service_key(host))
        if service is None:
            known = ", ".join(sorted(s.name for s in services.values())) or "none"
            variable = f"{SERVICE_PREFIX}{service_key(host)}"
            raise UsageError(f"unknown service {host!r}: {variable} is not set (configured services: {known})")
        resolution = service.resolver.resolve()
        print(f"{service.name}: {len(resolution.endpoints)} endpoint(s) from {service.resolver.source}")
        print(f"  balancer {service.lb_name}, {_describe_ttl(resolution)}")
        for endpoint in resolution.endpoints:
            print(f"  {_describe_endpoint(endpoint)}")
    return EXIT_OK


def run_status_command(args: argparse.Namespace) -> int:
    """``meshlib status``: fetch ``/status`` from the admin endpoint and print it."""
    if args.addr:
        address = parse_admin_addr("--addr", args.addr)
    else:
        raw = os.environ.get("MESHLIB_ADMIN_ADDR", "").strip()
        address = parse_admin_addr("MESHLIB_ADMIN_ADDR" if raw else "default", raw or DEFAULT_ADMIN_ADDR)
    host, port = address
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        payload = fetch_status(address)
    except (OSError, ValueError) as exc:
        print(
            f"meshlib: no admin endpoint answered at http://{where}/status ({exc}); start the process with "
            f"MESHLIB_ADMIN_ADDR={where} (or pass --addr)",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    print(json.dumps(payload, indent=2) if args.json else format_status(payload))
    return EXIT_OK


def _describe_ttl(resolution: Resolution) -> str:
    """How long the answer may be cached, in words."""
    if resolution.watch:
        return "watched (updates pushed)"
    if resolution.ttl is None:
        return "never expires"
    return f"ttl {resolution.ttl:g} s"


def _describe_endpoint(endpoint: Endpoint) -> str:
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
    except (ConfigError, UsageError) as exc:
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
