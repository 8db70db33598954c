"""``MESHLIB_*`` environment variables (and constructor arguments) turned into typed, validated settings.

Every variable is read here and nowhere else, so ``docs/configuration.md`` can list them all. A bad value
raises :class:`meshlib.ConfigError` naming the variable, the value and what was expected, at client
construction; nothing is validated lazily on the request path.

Naming: ``MESHLIB_SERVICE_<NAME>=<target URI>`` declares a mesh service, where ``<NAME>`` is the request
host upper-cased with ``-`` and ``.`` as ``_`` (``user-api.internal`` -> ``USER_API_INTERNAL``). A
per-service setting is the global variable's suffix after a double underscore:
``MESHLIB_SERVICE_PAYMENTS__LB=ring_hash`` overrides ``MESHLIB_LB`` for ``payments`` only.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from meshlib.errors import ConfigError

logger = logging.getLogger("meshlib.config")

ENV_PREFIX = "MESHLIB_"
SERVICE_PREFIX = "MESHLIB_SERVICE_"
#: Separates a service name from a per-service setting: ``MESHLIB_SERVICE_PAYMENTS__LB``.
SERVICE_SETTING_SEPARATOR = "__"

LB_NAMES = ("p2c_ewma", "round_robin", "least_request", "random", "ring_hash")

#: Per-service settings: suffix after ``MESHLIB_SERVICE_<NAME>__`` -> ServiceConfig field.
SERVICE_SETTINGS = {"LB": "lb", "HASH_HEADER": "hash_header"}


def service_key(host: str) -> str:
    """The ``<NAME>`` part of ``MESHLIB_SERVICE_<NAME>`` for a request host (``user-api`` -> ``USER_API``)."""
    return host.upper().replace("-", "_").replace(".", "_")


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """One mesh service: its logical name, discovery target, and settings that override the mesh defaults.

    ``variable`` is where the target came from (an environment variable or a constructor argument), so a
    bad target can be reported against it.
    """

    name: str
    target: str
    lb: str | None = None
    hash_header: str | None = None
    variable: str = ""


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """All mesh settings of one client. Immutable; build it with :meth:`from_env`.

    Defaults and where they come from:

    * ``lb="p2c_ewma"`` -- Linkerd's and Finagle's default balancer (P2C over peak-EWMA latency).
    * ``ewma_decay=10 s``, ``default_rtt=30 ms`` -- Linkerd's peak-EWMA decay and its ``MIN_DEFAULT_RTT``.
    * ``ttl_min=5 s`` / ``ttl_max=300 s`` -- DNS answers are cached for their TTL clamped to this range
      (Envoy/Finagle poll every 5 s; Linkerd clamps TTLs the same way).
    * ``max_stale=3600 s`` -- how long the last good endpoint set keeps serving while discovery fails
      (Consul's agent cache serves stale for days; an hour bounds how wrong we can be).
    * ``dns_timeout=2 s`` -- one DNS query's lifetime, all nameservers included.
    """

    services: Mapping[str, ServiceConfig] = field(default_factory=lambda: MappingProxyType({}))
    lb: str = "p2c_ewma"
    hash_header: str = "x-meshlib-hash-key"
    dns_servers: tuple[tuple[str, int], ...] | None = None
    dns_timeout: float = 2.0
    ttl_min: float = 5.0
    ttl_max: float = 300.0
    max_stale: float = 3600.0
    ewma_decay: float = 10.0
    default_rtt: float = 0.030

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        services: Mapping[str, str | ServiceConfig] | None = None,
        lb: str | None = None,
        dns_servers: str | list[str] | tuple[str, ...] | None = None,
    ) -> MeshConfig:
        """Read ``MESHLIB_*`` from ``environ`` (default ``os.environ``); arguments given here win."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name, (attr, parse) in _GLOBALS.items():
            raw = env.get(name)
            if raw is not None and raw.strip() != "":
                values[attr] = parse(name, raw.strip())
        if lb is not None:
            values["lb"] = _parse_lb("lb (argument)", lb)
        if dns_servers is not None:
            raw_servers = dns_servers if isinstance(dns_servers, str) else ",".join(dns_servers)
            values["dns_servers"] = _parse_dns_servers("dns_servers (argument)", raw_servers)
        config = cls(**values)  # type: ignore[arg-type]
        if config.ttl_min > config.ttl_max:
            raise ConfigError(
                "MESHLIB_DNS_TTL_MIN",
                config.ttl_min,
                f"a duration no larger than MESHLIB_DNS_TTL_MAX ({config.ttl_max})",
            )
        found = _services_from_env(env)
        _warn_unknown(env)
        for host, spec in (services or {}).items():
            if isinstance(spec, ServiceConfig):
                found[service_key(spec.name or host)] = replace(spec, name=spec.name or host.lower())
            else:
                key = service_key(host)
                previous = found.get(key)
                found[key] = ServiceConfig(
                    name=host.lower(),
                    target=spec,
                    lb=previous.lb if previous else None,
                    hash_header=previous.hash_header if previous else None,
                    variable=f"services[{host!r}] (argument)",
                )
        for svc in found.values():
            if svc.lb is not None:
                _parse_lb(f"{SERVICE_PREFIX}{service_key(svc.name)}__LB", svc.lb)
        return replace(config, services=MappingProxyType(found))

    def service(self, host: str) -> ServiceConfig | None:
        """The service a request host names, or ``None`` when the host is not in the mesh."""
        return self.services.get(service_key(host))


def _services_from_env(env: Mapping[str, str]) -> dict[str, ServiceConfig]:
    targets: dict[str, ServiceConfig] = {}
    settings: dict[str, dict[str, str]] = {}
    for variable, raw in env.items():
        if not variable.startswith(SERVICE_PREFIX):
            continue
        rest = variable[len(SERVICE_PREFIX) :]
        if SERVICE_SETTING_SEPARATOR in rest:
            key, setting = rest.split(SERVICE_SETTING_SEPARATOR, 1)
            if setting not in SERVICE_SETTINGS:
                raise ConfigError(variable, raw, f"a per-service setting, one of {', '.join(sorted(SERVICE_SETTINGS))}")
            settings.setdefault(key, {})[SERVICE_SETTINGS[setting]] = raw.strip()
            continue
        if not rest or not re.fullmatch(r"[A-Z0-9_]+", rest):
            raise ConfigError(
                variable, raw, "a service name of upper-case letters, digits and '_' after MESHLIB_SERVICE_"
            )
        if not raw.strip():
            raise ConfigError(variable, raw, "a discovery target URI such as static://10.0.0.5:8080")
        targets[rest] = ServiceConfig(name=rest.lower(), target=raw.strip(), variable=variable)
    for key, extra in settings.items():
        if key not in targets:
            variable = f"{SERVICE_PREFIX}{key}{SERVICE_SETTING_SEPARATOR}{next(iter(extra)).upper()}"
            raise ConfigError(variable, next(iter(extra.values())), f"a service declared by {SERVICE_PREFIX}{key}")
        targets[key] = replace(targets[key], **extra)
    return targets


def _warn_unknown(env: Mapping[str, str]) -> None:
    """Log (not fail) ``MESHLIB_*`` variables this version does not know: likely typos, or newer settings."""
    for variable in env:
        if variable.startswith(ENV_PREFIX) and not variable.startswith(SERVICE_PREFIX) and variable not in KNOWN:
            logger.warning("ignoring unknown environment variable %s (known: %s)", variable, ", ".join(sorted(KNOWN)))


# --- value parsers: each takes (variable, raw) and raises ConfigError naming both -----------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNITS = {None: 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "h": 3600.0}


def parse_duration(variable: str, raw: str, *, allow_zero: bool = False) -> float:
    """Seconds from ``"1.5"``, ``"1.5s"``, ``"250ms"``, ``"5m"`` or ``"1h"``."""
    match = _DURATION.match(raw)
    if match is None:
        raise ConfigError(variable, raw, "a duration such as 2, 1.5s, 250ms, 5m or 1h")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0 and not allow_zero:
        raise ConfigError(variable, raw, "a duration greater than zero")
    return seconds


def parse_port(variable: str, raw: str) -> int:
    """A TCP/UDP port number in 1..65535."""
    try:
        port = int(raw)
    except ValueError:
        raise ConfigError(variable, raw, "a port number from 1 to 65535") from None
    if not 1 <= port <= 65535:
        raise ConfigError(variable, raw, "a port number from 1 to 65535")
    return port


def _parse_lb(variable: str, raw: str) -> str:
    name = raw.strip().lower()
    if name not in LB_NAMES:
        raise ConfigError(variable, raw, f"one of {', '.join(LB_NAMES)}")
    return name


def _parse_header(variable: str, raw: str) -> str:
    if not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", raw):
        raise ConfigError(variable, raw, "an HTTP header name")
    return raw.lower()


def _parse_dns_servers(variable: str, raw: str) -> tuple[tuple[str, int], ...]:
    """``ip[:port]`` list, comma separated; IPv6 as ``[::1]:53``. Names are refused (no DNS to find DNS)."""
    expected = "a comma-separated list of nameserver IP addresses with optional port, e.g. 127.0.0.1:5353,[::1]:53"
    servers: list[tuple[str, int]] = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            raise ConfigError(variable, raw, expected)
        host, port = item, 53
        if item.startswith("["):
            end = item.find("]")
            if end < 0:
                raise ConfigError(variable, raw, expected)
            host, rest = item[1:end], item[end + 1 :]
            if rest:
                if not rest.startswith(":"):
                    raise ConfigError(variable, raw, expected)
                port = parse_port(variable, rest[1:]) if rest[1:].isdigit() else _bad(variable, raw, expected)
        elif item.count(":") == 1:
            host, port_text = item.split(":")
            port = parse_port(variable, port_text) if port_text.isdigit() else _bad(variable, raw, expected)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(variable, raw, expected) from None
        servers.append((host, port))
    return tuple(servers)


def _bad(variable: str, raw: str, expected: str) -> int:
    raise ConfigError(variable, raw, expected)


def _duration(variable: str, raw: str) -> float:
    return parse_duration(variable, raw)


_GLOBALS = {
    "MESHLIB_LB": ("lb", _parse_lb),
    "MESHLIB_HASH_HEADER": ("hash_header", _parse_header),
    "MESHLIB_DNS_SERVERS": ("dns_servers", _parse_dns_servers),
    "MESHLIB_DNS_TIMEOUT": ("dns_timeout", _duration),
    "MESHLIB_DNS_TTL_MIN": ("ttl_min", _duration),
    "MESHLIB_DNS_TTL_MAX": ("ttl_max", _duration),
    "MESHLIB_DISCOVERY_MAX_STALE": ("max_stale", _duration),
    "MESHLIB_EWMA_DECAY": ("ewma_decay", _duration),
    "MESHLIB_EWMA_DEFAULT_RTT": ("default_rtt", _duration),
}

#: Variables read by other parts of meshlib (kept here so unknown-variable warnings know them).
KNOWN = frozenset(_GLOBALS)
