"""Value parsers: each takes ``(variable, raw)`` and returns a typed value or raises :class:`ConfigError`.

Pure functions, no environment access: :mod:`meshlib._config.env` decides which variable goes through which
parser. Every :class:`ConfigError` names the variable, the raw value and what was expected. Ranges that need
more than one value (a backoff base against its cap, ``ttl_min`` against ``ttl_max``...) are checked by the
settings classes of :mod:`meshlib._config.model` or by the reader.
"""

from __future__ import annotations

import ipaddress
import re

from meshlib.errors import ConfigError

LB_NAMES = ("p2c_ewma", "round_robin", "least_request", "random", "ring_hash")

#: ``MESHLIB_INNER_TRANSPORT``: what each mesh endpoint's pooled transport is built with (see ``meshlib.client``).
INNER_TRANSPORTS = ("httpx", "aiohttp")

#: What a fraction setting (``MESHLIB_RETRY_BUDGET_PERCENT``, despite its name) expects.
FRACTION_EXPECTED = "a fraction from 0 to 1 such as 0.2, or a percentage such as 20%"
#: What a percentage setting (``MESHLIB_OUTLIER_MAX_PERCENT``) expects.
PERCENT_EXPECTED = "a percentage from 0 to 100 such as 10 or 10%"
#: ``MESHLIB_SERVER_TELEMETRY``: who makes the SERVER span and HTTP server metrics of an inbound request.
SERVER_TELEMETRY_MODES = ("auto", "on", "off")
INNER_TRANSPORT_EXPECTED = "one of httpx, aiohttp (aiohttp: meshlib.AsyncClient only, pip install 'meshlib[aiohttp]')"

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


def parse_positive_duration(variable: str, raw: str) -> float:
    """A duration greater than zero (:func:`parse_duration`)."""
    return parse_duration(variable, raw)


def parse_duration_or_zero(variable: str, raw: str) -> float:
    """A duration of zero or more (:func:`parse_duration` with ``allow_zero``)."""
    return parse_duration(variable, raw, allow_zero=True)


def parse_admin_addr(variable: str, raw: str) -> tuple[str, int]:
    """``MESHLIB_ADMIN_ADDR``: ``127.0.0.1:9901``, ``[::1]:9901`` or ``localhost:9901``; port 0 picks a free one.

    Loopback only: the admin endpoint shows the mesh's topology and state and has no authentication (as
    Envoy's admin, which its docs say never to expose), so anything else is refused here.
    """
    expected = (
        "a loopback address and port such as 127.0.0.1:9901 or [::1]:9901 "
        "(the admin endpoint is never served beyond this host)"
    )
    text = raw.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ConfigError(variable, raw, expected)
        host, port_text = text[1:end], text[end + 2 :]
    else:
        host, separator, port_text = text.rpartition(":")
        if not separator or ":" in host:
            raise ConfigError(variable, raw, expected)
    if host.lower() == "localhost":  # a name could resolve anywhere: use the loopback literal it stands for
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(variable, raw, expected) from None
    if not ip.is_loopback:
        raise ConfigError(variable, raw, expected)
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(variable, raw, expected)
    return str(ip), int(port_text)


_HOST_PATTERN = re.compile(r"\.?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")


def parse_propagate_to(variable: str, raw: str) -> tuple[str, ...]:
    """``MESHLIB_PROPAGATE_TO``: hosts outside the mesh that may receive mesh headers (trace, baggage, deadline).

    Comma-separated host names or IP addresses; a leading dot (``.corp.example``) matches every subdomain.
    Nothing is sent to outside hosts by default: baggage may carry data meant for the mesh only.
    """
    expected = "a comma-separated list of host names, IP addresses or .domain suffixes, e.g. api.partner.example,.corp"
    hosts: list[str] = []
    for item in (part.strip().lower() for part in raw.split(",")):
        if not item:
            raise ConfigError(variable, raw, expected)
        try:
            hosts.append(str(ipaddress.ip_address(item.strip("[]"))))
        except ValueError:
            if not _HOST_PATTERN.fullmatch(item):
                raise ConfigError(variable, raw, expected) from None
            hosts.append(item)
    return tuple(hosts)


def parse_port(variable: str, raw: str) -> int:
    """A TCP/UDP port number in 1..65535."""
    try:
        port = int(raw)
    except ValueError:
        raise ConfigError(variable, raw, "a port number from 1 to 65535") from None
    if not 1 <= port <= 65535:
        raise ConfigError(variable, raw, "a port number from 1 to 65535")
    return port


def parse_inner_transport(variable: str, raw: str) -> str:
    """``MESHLIB_INNER_TRANSPORT``: ``httpx`` or ``aiohttp`` (case-insensitive)."""
    name = raw.strip().lower()
    if name not in INNER_TRANSPORTS:
        raise ConfigError(variable, raw, INNER_TRANSPORT_EXPECTED)
    return name


def parse_server_telemetry(variable: str, raw: str) -> str:
    """``MESHLIB_SERVER_TELEMETRY``: ``auto``, ``on`` or ``off`` (case-insensitive)."""
    name = raw.strip().lower()
    if name not in SERVER_TELEMETRY_MODES:
        raise ConfigError(variable, raw, f"one of {', '.join(SERVER_TELEMETRY_MODES)}")
    return name


def parse_lb(variable: str, raw: str) -> str:
    """A balancer name of :data:`LB_NAMES` (case-insensitive)."""
    name = raw.strip().lower()
    if name not in LB_NAMES:
        raise ConfigError(variable, raw, f"one of {', '.join(LB_NAMES)}")
    return name


def parse_header(variable: str, raw: str) -> str:
    """An HTTP header name (an RFC 9110 token), lower-cased."""
    if not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", raw):
        raise ConfigError(variable, raw, "an HTTP header name")
    return raw.lower()


def parse_dns_servers(variable: str, raw: str) -> tuple[tuple[str, int], ...]:
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


def parse_int(variable: str, raw: str) -> int:
    """A whole number of decimal digits (no sign)."""
    if not re.fullmatch(r"[0-9]+", raw):
        raise ConfigError(variable, raw, "a whole number such as 5")
    return int(raw)


_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def parse_bool(variable: str, raw: str) -> bool:
    """``true``/``false``, ``1``/``0`` or ``yes``/``no`` (case-insensitive)."""
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(variable, raw, "a boolean: true/false, 1/0 or yes/no")


def parse_text(variable: str, raw: str) -> str:
    """The value as given (file paths, SPIFFE IDs: checked where they are used)."""
    return raw


def parse_server_name(variable: str, raw: str) -> str:
    """A TLS server name, lower-cased."""
    return raw.lower()


def parse_statuses(variable: str, raw: str) -> frozenset[int]:
    """``502,503,504``; ``none`` for no status-based retries."""
    if raw.strip().lower() == "none":
        return frozenset()
    expected = "a comma-separated list of HTTP status codes (100-599) such as 502,503,504, or none"
    statuses: set[int] = set()
    for item in (part.strip() for part in raw.split(",")):
        if not re.fullmatch(r"[1-5][0-9][0-9]", item):
            raise ConfigError(variable, raw, expected)
        statuses.add(int(item))
    return frozenset(statuses)


def _parse_number(variable: str, raw: str, expected: str) -> tuple[float, bool]:
    """A non-negative decimal, and whether it carried a ``%`` suffix."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?|\.\d+)\s*(%?)", raw.strip())
    if match is None:
        raise ConfigError(variable, raw, expected)
    return float(match.group(1)), bool(match.group(2))


def parse_fraction(variable: str, raw: str) -> float:
    """``0.2`` or ``20%`` -> 0.2 (range checked by :class:`~meshlib._config.model.ResilienceSettings`)."""
    value, percent = _parse_number(variable, raw, FRACTION_EXPECTED)
    return value / 100.0 if percent else value


def parse_percent(variable: str, raw: str) -> float:
    """``10`` or ``10%`` -> 10.0 (range checked by :class:`~meshlib._config.model.ResilienceSettings`)."""
    return _parse_number(variable, raw, PERCENT_EXPECTED)[0]
