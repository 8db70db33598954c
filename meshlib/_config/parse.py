"""Value parsers: each takes ``(variable, raw)`` and returns a typed value or raises :class:`ConfigError`.

Pure functions, no environment access: :mod:`meshlib._config.env` decides which variable goes through which
parser. Every :class:`ConfigError` names the variable, the raw value and what was expected. Ranges that need
more than one value (a backoff base against its cap, ``ttl_min`` against ``ttl_max``...) are checked by the
settings classes of :mod:`meshlib._config.model` or by the reader.
"""

from __future__ import annotations

import ipaddress
import re
import threading
from fractions import Fraction
from urllib.parse import unquote_plus

from meshlib.errors import ConfigError

LB_NAMES = ("p2c_ewma", "round_robin", "least_request", "random", "ring_hash", "weighted_round_robin")

#: ``MESHLIB_INNER_TRANSPORT``: what each mesh endpoint's pooled transport is built with (see ``meshlib.client``).
INNER_TRANSPORTS = ("httpx", "aiohttp")

#: What a fraction setting (``MESHLIB_RETRY_BUDGET_PERCENT``, despite its name) expects.
FRACTION_EXPECTED = "a fraction from 0 to 1 such as 0.2, or a percentage such as 20%"
#: What a percentage setting (``MESHLIB_OUTLIER_MAX_PERCENT``) expects.
PERCENT_EXPECTED = "a percentage from 0 to 100 such as 10 or 10%"
#: ``MESHLIB_SERVER_TELEMETRY``: who makes the SERVER span and HTTP server metrics of an inbound request.
SERVER_TELEMETRY_MODES = ("auto", "on", "off")
INNER_TRANSPORT_EXPECTED = "one of httpx, aiohttp (aiohttp: meshlib.AsyncClient only, pip install 'meshlib[aiohttp]')"

#: The longest duration any setting accepts: 30 days (``720h``). Durations end up as waits of background
#: threads and timers, and a wait above ``threading.TIMEOUT_MAX`` (about 49.7 days on Windows, 292 years
#: elsewhere) raises in that thread, long after construction; 30 days is below it everywhere.
MAX_DURATION = min(30 * 86400.0, threading.TIMEOUT_MAX)
#: Values longer than this many characters are refused before any number is converted (``int()`` refuses
#: 4,300 digits with a ValueError of its own; ``float()`` turns 400 nines into infinity).
MAX_NUMBER_TEXT = 64
DURATION_EXPECTED = (
    "a duration such as 2, 1.5s, 250ms, 5m, 1h or 1h30m (Go syntax: units ns, us/\u00b5s, ms, s, m, h), "
    "at most 720h (30 days)"
)

# Every number pattern is ASCII: ``\d`` and ``str.isdigit`` accept full-width digits and superscripts.
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*(ms|s|m|h)?", re.ASCII)
_GO_DURATION = re.compile(r"\+?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:ns|us|\u00b5s|\u03bcs|ms|s|m|h))+")
_GO_SEGMENT = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_UNITS = {
    None: Fraction(1),
    "h": Fraction(3600),
    "m": Fraction(60),
    "s": Fraction(1),
    "ms": Fraction(1, 1000),
    "us": Fraction(1, 10**6),
    "\u00b5s": Fraction(1, 10**6),  # micro sign, as Go writes it
    "\u03bcs": Fraction(1, 10**6),  # Greek small letter mu, also accepted by Go
    "ns": Fraction(1, 10**9),
}


def shown(raw: str, limit: int = MAX_NUMBER_TEXT) -> str:
    """``raw`` for an error message: cut to its first ``limit`` characters, saying how long it was."""
    return raw if len(raw) <= limit else f"{raw[:limit]}... ({len(raw)} characters)"


def ascii_digits(text: str, max_digits: int) -> bool:
    """Whether ``text`` is 1 to ``max_digits`` ASCII digits (``str.isdigit`` also accepts '\u00b2' and '\uff18')."""
    return 0 < len(text) <= max_digits and text.isascii() and text.isdigit()


def parse_duration(variable: str, raw: str, *, allow_zero: bool = False) -> float:
    """Seconds from ``"1.5"`` (seconds), ``"1.5s"``, ``"250ms"``, ``"5m"``, ``"1h"`` or a Go duration.

    Go's ``time.ParseDuration`` syntax, as Consul, Envoy and Linkerd configurations write durations:
    one or more ``<number><unit>`` with units ``ns``, ``us`` (or ``\u00b5s``/``\u03bcs``), ``ms``, ``s``, ``m``, ``h``,
    e.g. ``1h30m``, ``500us``, ``300000ms``, ``1.5s``. Negative, non-finite and longer-than
    :data:`MAX_DURATION` values are refused.
    """
    text = raw.strip()
    if len(text) > MAX_NUMBER_TEXT:
        raise ConfigError(variable, shown(raw), f"{DURATION_EXPECTED} (at most {MAX_NUMBER_TEXT} characters)")
    if text.startswith("-"):
        raise ConfigError(variable, raw, f"{DURATION_EXPECTED}; not a negative duration")
    simple = _DURATION.fullmatch(text)
    if simple is not None:
        seconds = Fraction(simple.group(1)) * _UNITS[simple.group(2)]
    elif _GO_DURATION.fullmatch(text):
        seconds = sum((Fraction(n) * _UNITS[u] for n, u in _GO_SEGMENT.findall(text)), Fraction(0))
    else:
        raise ConfigError(variable, raw, DURATION_EXPECTED)
    if seconds > Fraction(MAX_DURATION):
        raise ConfigError(variable, raw, f"a duration of at most 720h (30 days, {MAX_DURATION:.0f}s)")
    if seconds <= 0 and not allow_zero:
        raise ConfigError(variable, raw, "a duration greater than zero")
    return float(seconds)


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
    if not ascii_digits(port_text, 5) or int(port_text) > 65535:
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
    """A TCP/UDP port number in 1..65535, in ASCII digits (no sign, no ``_``, no full-width digits)."""
    text = raw.strip()
    if not ascii_digits(text, 5) or not 1 <= int(text) <= 65535:
        raise ConfigError(variable, shown(raw), "a port number from 1 to 65535")
    return int(text)


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


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
HEADER_NAME_EXPECTED = "an HTTP header name (an RFC 9110 token: letters, digits and !#$%&'*+-.^_`|~)"


def is_header_name(text: str) -> bool:
    """Whether ``text`` is an RFC 9110 token, i.e. a valid header name (no space, colon, CR or LF)."""
    return _TOKEN.fullmatch(text) is not None


def parse_header(variable: str, raw: str) -> str:
    """An HTTP header name (an RFC 9110 token), lower-cased."""
    if not is_header_name(raw):
        raise ConfigError(variable, shown(raw), HEADER_NAME_EXPECTED)
    return raw.lower()


def control_character(text: str) -> str | None:
    """Where ``text`` has a control character (CR, LF, NUL, DEL...; not TAB), as ``U+000A at position 5``.

    ``None`` when it has none. A header value with one is refused by whoever sends it, or worse, splits
    into two headers; a secret's position is safe to show, its characters are not.
    """
    for position, char in enumerate(text):
        if (ord(char) < 0x20 and char != "\t") or ord(char) == 0x7F:
            return f"U+{ord(char):04X} at position {position}"
    return None


def check_header_value(variable: str, raw: str, *, secret: bool = False) -> str:
    """``raw`` if it may be sent as an HTTP header value (no :func:`control_character`), else a ConfigError.

    ``secret`` values (tokens, passwords) are never shown: the error names the variable and the offending
    character's position only.
    """
    found = control_character(raw)
    if found is not None:
        what = f"no control characters (found {found})"
        if secret:
            raise ConfigError(variable, REDACTED, f"a value with {what}")
        raise ConfigError(variable, raw, f"an HTTP header value with {what}")
    return raw


REDACTED = "<redacted>"
#: Query parameter names (decoded, lower-cased) whose values are secrets: anything with "token" in it,
#: and the usual credential names.
_SECRET_PARAMS = frozenset({"password", "passwd", "pwd", "secret", "auth", "authorization", "apikey", "api_key", "key"})


def is_secret_param(name: str) -> bool:
    """Whether a (decoded) query parameter name holds a secret: ``token``, ``TOKEN``, ``acl_token``, ``password``..."""
    lowered = name.strip().lower()
    return "token" in lowered or lowered in _SECRET_PARAMS


def uri_secrets(uri: str) -> list[str]:
    """The secrets written in ``uri``: its user info (``user:pw`` of ``user:pw@``), and the values of secret
    query parameters (``token=``, ``TOKEN=``, ``%74oken=``...) as written and decoded; longest first."""
    head, question, query = uri.partition("?")
    query = query.partition("#")[0]
    rest = head.rpartition("://")[2]
    found = {rest.rpartition("@")[0]} if "@" in rest else set()
    for part in query.split("&") if question else ():
        key, equals, value = part.partition("=")
        if equals and is_secret_param(unquote_plus(key)):
            found.update({value, unquote_plus(value)})
    return sorted((secret for secret in found if secret), key=len, reverse=True)


def redact_uri(uri: str, text: str | None = None) -> str:
    """``text`` (default: ``uri`` itself) without the :func:`uri_secrets` of ``uri``: safe to print.

    Works on the raw text, so a secret written percent-encoded (``%74oken=...``, ``token=a%2Fb``) or in
    upper case (``TOKEN=``) is caught as well; the rest is kept, to say which value is meant.
    """
    text = uri if text is None else text
    for secret in uri_secrets(uri):
        text = text.replace(secret, REDACTED)
    return text


def parse_dns_servers(variable: str, raw: str) -> tuple[tuple[str, int], ...]:
    """``ip[:port]`` list, comma separated; IPv6 as ``[::1]:53``. Names are refused (no DNS to find DNS).

    A bare IPv6 address means port 53 (``::1``), unless it could also be read as an address and a port:
    ``::1:5353`` is the address ``::1:5353`` to Python but ``[::1]:5353`` to whoever wrote it, so it is
    refused with a message that shows both bracketed spellings.
    """
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
                port = _dns_port(variable, raw, rest[1:], expected)
        elif item.count(":") == 1:
            host, port_text = item.split(":")
            port = _dns_port(variable, raw, port_text, expected)
        elif ":" in item:
            address, _, last = item.rpartition(":")
            if ascii_digits(last, 5) and _is_ipv6(address):
                raise ConfigError(
                    variable,
                    raw,
                    f"{expected}; {item!r} is ambiguous: write [{address}]:{last} for port {last}, "
                    f"or [{item}] for that address on port 53",
                )
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(variable, raw, expected) from None
        servers.append((host, port))
    return tuple(servers)


def _dns_port(variable: str, raw: str, text: str, expected: str) -> int:
    if not ascii_digits(text, 5):
        raise ConfigError(variable, raw, expected)
    return parse_port(variable, text)


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


def parse_int(variable: str, raw: str) -> int:
    """A whole number of ASCII decimal digits (no sign), at most 18 of them (ranges are the settings' to check).

    The length is checked before ``int()``, which refuses more than 4,300 digits with its own ``ValueError``.
    """
    digits = raw.lstrip("0") or "0"
    if not ascii_digits(raw, len(raw)) or len(digits) > 18:
        raise ConfigError(variable, shown(raw), "a whole number such as 5 (ASCII digits, at most 18 of them)")
    return int(digits)


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


#: A Kubernetes namespace name: an RFC 1123 DNS label (lower-case letters, digits and '-', 1 to 63 characters).
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", re.ASCII)
NAMESPACE_EXPECTED = (
    "a Kubernetes namespace name: an RFC 1123 DNS label of at most 63 lower-case letters, digits and '-', "
    "starting and ending with a letter or digit (e.g. payments-prod)"
)


def parse_namespace(variable: str, raw: str) -> str:
    """``MESHLIB_NAMESPACE``: a Kubernetes namespace name (an RFC 1123 DNS label), as written (no case folding).

    Kubernetes refuses upper case in namespace names, so ``Payments`` is refused here too rather than folded:
    a route that names namespace ``payments`` must not match a client that said ``Payments`` by accident.
    """
    text = raw.strip()
    if _DNS_LABEL.fullmatch(text) is None:
        raise ConfigError(variable, shown(raw), NAMESPACE_EXPECTED)
    return text


XDS_MODE_EXPECTED = "all (every host the xDS control plane has a Listener for is routed by it), or unset"


def parse_xds_mode(variable: str, raw: str) -> str:
    """``MESHLIB_XDS``: ``all``; any other value is refused (a typo must not leave xDS off silently)."""
    text = raw.strip().lower()
    if text != "all":
        raise ConfigError(variable, shown(raw), XDS_MODE_EXPECTED)
    return text


def is_namespace(text: object) -> bool:
    """Whether ``text`` is a valid :func:`parse_namespace` value."""
    return isinstance(text, str) and _DNS_LABEL.fullmatch(text) is not None


FILE_PATH_EXPECTED = "a file path (no NUL or other control characters)"


def parse_file_path(variable: str, raw: str) -> str:
    """A file path, stripped of surrounding blanks; control characters (NUL, CR, LF...) are refused.

    Whether the file exists and is usable is checked by whoever loads it, at client construction.
    """
    text = raw.strip()
    if control_character(text) is not None or "\t" in text:
        raise ConfigError(variable, shown(raw, 256), FILE_PATH_EXPECTED)
    return text


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
    text = raw.strip()
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*(%?)", text, re.ASCII)
    if match is None or len(text) > MAX_NUMBER_TEXT:
        raise ConfigError(variable, shown(raw), expected)
    return float(match.group(1)), bool(match.group(2))


def parse_fraction(variable: str, raw: str) -> float:
    """``0.2`` or ``20%`` -> 0.2 (range checked by :class:`~meshlib._config.model.ResilienceSettings`)."""
    value, percent = _parse_number(variable, raw, FRACTION_EXPECTED)
    return value / 100.0 if percent else value


def parse_percent(variable: str, raw: str) -> float:
    """``10`` or ``10%`` -> 10.0 (range checked by :class:`~meshlib._config.model.ResilienceSettings`)."""
    return _parse_number(variable, raw, PERCENT_EXPECTED)[0]
