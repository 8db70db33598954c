"""``MESHLIB_*`` environment variables (and constructor arguments) turned into typed, validated settings.

Every variable is read here and nowhere else, so ``docs/configuration.md`` can list them all. A bad value
raises :class:`meshlib.ConfigError` naming the variable, the value and what was expected, at client
construction; nothing is validated lazily on the request path.

Naming: ``MESHLIB_SERVICE_<NAME>=<target URI>`` declares a mesh service, where ``<NAME>`` is the request
host upper-cased with ``-`` and ``.`` as ``_`` (``user-api.internal`` -> ``USER_API_INTERNAL``). A
per-service setting is the global variable's suffix after a double underscore:
``MESHLIB_SERVICE_PAYMENTS__LB=ring_hash`` overrides ``MESHLIB_LB`` for ``payments`` only.

Call policies (``MESHLIB_TIMEOUT``, ``MESHLIB_RETRIES``...) become :class:`~meshlib.policy.Policy` layers and
resilience knobs (``MESHLIB_MAX_INFLIGHT``, ``MESHLIB_BREAKER_FAILURES``...) a :class:`ResilienceSettings`;
both work per service with the same suffix, and :meth:`MeshConfig.policy_for` / :meth:`MeshConfig.resilience_for`
answer per service from tables built once, at construction.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from meshlib.errors import ConfigError
from meshlib.policy import DEFAULT_POLICY, Policy
from meshlib.security.tls import DEFAULT_RELOAD_INTERVAL, TLSSettings

logger = logging.getLogger("meshlib.config")

ENV_PREFIX = "MESHLIB_"
SERVICE_PREFIX = "MESHLIB_SERVICE_"
#: Separates a service name from a per-service setting: ``MESHLIB_SERVICE_PAYMENTS__LB``.
SERVICE_SETTING_SEPARATOR = "__"

LB_NAMES = ("p2c_ewma", "round_robin", "least_request", "random", "ring_hash")

#: ``MESHLIB_INNER_TRANSPORT``: what each mesh endpoint's pooled transport is built with (see ``meshlib.client``).
INNER_TRANSPORTS = ("httpx", "aiohttp")

#: Per-service settings: suffix after ``MESHLIB_SERVICE_<NAME>__`` -> ServiceConfig field. Every policy and
#: resilience suffix (``TIMEOUT``, ``RETRIES``, ``BREAKER_FAILURES``...) is added below, after their tables.
SERVICE_SETTINGS = {"LB": "lb", "HASH_HEADER": "hash_header"}


def service_key(host: str) -> str:
    """The ``<NAME>`` part of ``MESHLIB_SERVICE_<NAME>`` for a request host (``user-api`` -> ``USER_API``)."""
    return host.upper().replace("-", "_").replace(".", "_")


def _check(owner: str, name: str, value: object, ok: bool, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{owner}.{name}", value, expected)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


@dataclass(frozen=True, slots=True)
class ResilienceSettings:
    """Per-service resilience machinery settings, read by the transport's budget, breakers and limits.

    Unlike :class:`~meshlib.policy.Policy` (rules of one call, overridable per call), these size state shared
    by every call to a service, so they are set per client and per service only. Defaults and sources:

    * ``retry_budget_percent=0.2``, ``retry_budget_min_per_second=10``, ``retry_budget_ttl=10 s`` -- retries
      may add at most 20 % of requests plus 10 retries/s, over a 10 s window: Finagle's ``RetryBudget()``
      defaults, also Linkerd's ``retryBudget`` and tower's ``Budget``. The ratio is a fraction (0.2 = 20 %),
      like Finagle's ``percentCanRetry``; the TTL is bounded to 1..60 s as in Finagle.
    * ``breaker_failures=5``, ``breaker_reset=10 s`` -- an endpoint's breaker opens after 5 consecutive
      failures (Envoy's and Finagle's failure-accrual count) and lets one probe through after 10 s.
    * ``outlier_failures=5``, ``outlier_base_ejection=30 s``, ``outlier_max_ejection=300 s``,
      ``outlier_max_percent=10`` -- Envoy's outlier detection: eject after 5 consecutive gateway failures
      for 30 s x ejection count, at most 300 s, never more than 10 % of endpoints (at least one).
    * ``max_inflight=1024`` -- concurrent requests per service before :class:`OverloadedError`: Envoy's
      ``max_requests`` circuit-breaker threshold.

    Invalid values raise :class:`meshlib.ConfigError` naming the field.
    """

    retry_budget_percent: float = 0.2
    retry_budget_min_per_second: int = 10
    retry_budget_ttl: float = 10.0
    breaker_failures: int = 5
    breaker_reset: float = 10.0
    outlier_failures: int = 5
    outlier_base_ejection: float = 30.0
    outlier_max_ejection: float = 300.0
    outlier_max_percent: float = 10.0
    max_inflight: int = 1024

    def __post_init__(self) -> None:
        own = "ResilienceSettings"
        ratio = self.retry_budget_percent
        _check(own, "retry_budget_percent", ratio, _is_number(ratio) and 0 <= ratio <= 1, _RATIO)
        floor = self.retry_budget_min_per_second
        _check(own, "retry_budget_min_per_second", floor, _is_int(floor) and floor >= 0, "an integer >= 0")
        ttl = self.retry_budget_ttl
        _check(own, "retry_budget_ttl", ttl, _is_number(ttl) and 1 <= ttl <= 60, "a duration from 1s to 60s")
        for name in ("breaker_failures", "outlier_failures", "max_inflight"):
            count = getattr(self, name)
            _check(own, name, count, _is_int(count) and count >= 1, "an integer >= 1")
        for name in ("breaker_reset", "outlier_base_ejection", "outlier_max_ejection"):
            seconds = getattr(self, name)
            ok = _is_number(seconds) and 0 < seconds < float("inf")
            _check(own, name, seconds, ok, "a duration greater than zero")
        base, most = self.outlier_base_ejection, self.outlier_max_ejection
        _check(own, "outlier_max_ejection", most, most >= base, f"a duration >= outlier_base_ejection ({base})")
        percent = self.outlier_max_percent
        _check(own, "outlier_max_percent", percent, _is_number(percent) and 0 <= percent <= 100, _PERCENT)


_RATIO = "a fraction from 0 to 1 such as 0.2, or a percentage such as 20%"
_PERCENT = "a percentage from 0 to 100 such as 10 or 10%"


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
    #: This service's policy layer (``MESHLIB_SERVICE_<NAME>__TIMEOUT``...): set fields override the mesh's.
    policy: Policy | None = None
    #: This service's complete resilience settings, or ``None`` for the mesh-wide ones.
    resilience: ResilienceSettings | None = None
    #: This service's complete TLS settings (``MESHLIB_SERVICE_<NAME>__TLS_*`` over ``MESHLIB_TLS_*``), or
    #: ``None`` for the mesh-wide ones.
    tls: TLSSettings | None = None


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
    * ``policy`` -- the mesh-wide call policy, :data:`~meshlib.policy.DEFAULT_POLICY` overridden by
      ``MESHLIB_TIMEOUT``, ``MESHLIB_RETRIES``...; always complete (every field set).
    * ``resilience`` -- the mesh-wide :class:`ResilienceSettings`.
    * ``tls`` -- the mesh-wide :class:`~meshlib.security.tls.TLSSettings` (``MESHLIB_TLS_*``), or ``None``:
      then services without TLS settings of their own connect with the client's httpx ``verify=``/``cert=``.
    * ``tls_reload_interval=5 s`` -- how often certificate files are checked for changes (0: never); see
      :data:`~meshlib.security.tls.DEFAULT_RELOAD_INTERVAL`.
    * ``admin_addr=None`` -- ``MESHLIB_ADMIN_ADDR``: the loopback ``(ip, port)`` of the admin endpoint
      (``/status``, ``/metrics``; see :mod:`meshlib.admin`), or ``None`` for none (the default).
    * ``propagate_to=()`` -- ``MESHLIB_PROPAGATE_TO``: hosts outside the mesh that may receive the mesh's
      trace, baggage and deadline headers (see :mod:`meshlib.telemetry.propagation`); none by default.
    * ``inner_transport="httpx"`` -- ``MESHLIB_INNER_TRANSPORT``: each endpoint's pooled transport, ``httpx``
      (``httpx.HTTPTransport`` / ``AsyncHTTPTransport``) or ``aiohttp`` (``httpx-aiohttp``, ``AsyncClient`` only,
      the ``aiohttp`` extra); a client's ``inner_transport=`` argument overrides it.

    :meth:`policy_for` and :meth:`resilience_for` answer per service from tables built at construction.
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
    policy: Policy = DEFAULT_POLICY
    resilience: ResilienceSettings = field(default_factory=ResilienceSettings)
    tls: TLSSettings | None = None
    tls_reload_interval: float = DEFAULT_RELOAD_INTERVAL
    admin_addr: tuple[str, int] | None = None
    propagate_to: tuple[str, ...] = ()
    inner_transport: str = "httpx"
    #: The environment the settings were read from (``Client(environ=...)`` or ``os.environ``), for sources that
    #: read their own ecosystem's variables (``CONSUL_*``). Kept out of repr and comparisons: it holds secrets.
    environ: Mapping[str, str] | None = field(default=None, repr=False, compare=False)
    _service_policies: Mapping[str, Policy] = field(init=False, repr=False, compare=False)
    _service_resilience: Mapping[str, ResilienceSettings] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        transport = self.inner_transport
        _check("MeshConfig", "inner_transport", transport, transport in INNER_TRANSPORTS, _INNER_EXPECTED)
        if not self.policy.complete:
            object.__setattr__(self, "policy", self.policy.resolved())
        policies = {key: self.policy.merge(svc.policy) for key, svc in self.services.items() if svc.policy is not None}
        resilience = {key: svc.resilience for key, svc in self.services.items() if svc.resilience is not None}
        object.__setattr__(self, "_service_policies", MappingProxyType(policies))
        object.__setattr__(self, "_service_resilience", MappingProxyType(resilience))

    def policy_for(self, key: str) -> Policy:
        """The complete call policy of service ``key`` (:func:`service_key` of the host): mesh ⊕ service layer."""
        return self._service_policies.get(key, self.policy)

    def resilience_for(self, key: str) -> ResilienceSettings:
        """The resilience settings of service ``key`` (:func:`service_key` of the host)."""
        return self._service_resilience.get(key, self.resilience)

    def tls_for(self, key: str) -> TLSSettings | None:
        """The TLS settings of service ``key``: its own, else the mesh-wide ones (``None``: none configured)."""
        svc = self.services.get(key)
        if svc is not None and svc.tls is not None:
            return svc.tls
        return self.tls

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        services: Mapping[str, str | ServiceConfig] | None = None,
        lb: str | None = None,
        dns_servers: str | list[str] | tuple[str, ...] | None = None,
        policy: Policy | None = None,
        tls: TLSSettings | None = None,
    ) -> MeshConfig:
        """Read ``MESHLIB_*`` from ``environ`` (default ``os.environ``); arguments given here win.

        ``policy`` overrides the set fields of the environment's mesh-wide policy (per-service variables
        still override it for their service). ``tls`` replaces the environment's mesh-wide ``MESHLIB_TLS_*``
        settings (per-service variables still apply on top of it).
        """
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name, (attr, parse) in _GLOBALS.items():
            raw = env.get(name)
            if raw is not None and raw.strip() != "":
                values[attr] = parse(name, raw.strip())
        global_settings = {suffix: (f"{ENV_PREFIX}{suffix}", env.get(f"{ENV_PREFIX}{suffix}")) for suffix in _LAYERED}
        mesh_policy = _policy_layer(DEFAULT_POLICY, global_settings)
        if policy is not None:
            mesh_policy = mesh_policy.merge(policy)
        values["policy"] = mesh_policy
        values["resilience"] = _resilience_layer(ResilienceSettings(), global_settings)
        values["tls"] = tls if tls is not None else _tls_layer(None, global_settings, mesh_wide=True)
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
        found = _services_from_env(env, config.policy, config.resilience, config.tls)
        _warn_unknown(env)
        for host, spec in (services or {}).items():
            if isinstance(spec, ServiceConfig):
                found[service_key(spec.name or host)] = replace(spec, name=spec.name or host.lower())
            else:
                key = service_key(host)
                previous = found.get(key)
                variable = f"services[{host!r}] (argument)"
                if previous is not None:  # keep the per-service settings of the environment
                    found[key] = replace(previous, name=host.lower(), target=spec, variable=variable)
                else:
                    found[key] = ServiceConfig(name=host.lower(), target=spec, variable=variable)
        for svc in found.values():
            if svc.lb is not None:
                _parse_lb(f"{SERVICE_PREFIX}{service_key(svc.name)}__LB", svc.lb)
        return replace(config, services=MappingProxyType(found), environ=environ)

    def service(self, host: str) -> ServiceConfig | None:
        """The service a request host names, or ``None`` when the host is not in the mesh."""
        return self.services.get(service_key(host))


def _services_from_env(
    env: Mapping[str, str],
    mesh_policy: Policy,
    mesh_resilience: ResilienceSettings,
    mesh_tls: TLSSettings | None = None,
) -> dict[str, ServiceConfig]:
    targets: dict[str, ServiceConfig] = {}
    settings: dict[str, dict[str, tuple[str, str]]] = {}  # key -> suffix -> (variable, raw)
    for variable, raw in env.items():
        if not variable.startswith(SERVICE_PREFIX):
            continue
        rest = variable[len(SERVICE_PREFIX) :]
        if SERVICE_SETTING_SEPARATOR in rest:
            key, setting = rest.split(SERVICE_SETTING_SEPARATOR, 1)
            if setting not in SERVICE_SETTINGS:
                raise ConfigError(variable, raw, f"a per-service setting, one of {', '.join(sorted(SERVICE_SETTINGS))}")
            settings.setdefault(key, {})[setting] = (variable, raw)
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
            variable, raw = next(iter(extra.values()))
            raise ConfigError(variable, raw, f"a service declared by {SERVICE_PREFIX}{key}")
        fields: dict[str, object] = {
            SERVICE_SETTINGS[suffix]: raw.strip() for suffix, (_, raw) in extra.items() if suffix not in _LAYERED
        }
        layered = {suffix: pair for suffix, pair in extra.items() if suffix in _LAYERED}
        if any(suffix in _POLICY_SETTINGS for suffix in layered):
            layer = _policy_layer(Policy(), layered)
            _check_backoff(mesh_policy.merge(layer), layered)
            fields["policy"] = layer
        if any(suffix in _RESILIENCE_SETTINGS for suffix in layered):
            fields["resilience"] = _resilience_layer(mesh_resilience, layered)
        if any(suffix in _TLS_SETTINGS for suffix in layered):
            fields["tls"] = _tls_layer(mesh_tls, layered)
        targets[key] = replace(targets[key], **fields)  # type: ignore[arg-type]
    return targets


def _parsed(
    table: Mapping[str, tuple[str, Callable[[str, str], object]]], found: Mapping[str, tuple[str, str | None]]
) -> dict[str, tuple[str, str, object]]:
    """attr -> (variable, raw, value) for the settings of ``table`` present (and non-empty) in ``found``."""
    parsed: dict[str, tuple[str, str, object]] = {}
    for suffix, (attr, parse) in table.items():
        variable, raw = found.get(suffix, ("", None))
        if raw is not None and raw.strip() != "":
            parsed[attr] = (variable, raw, parse(variable, raw.strip()))
    return parsed


def _policy_layer(base: Policy, found: Mapping[str, tuple[str, str | None]]) -> Policy:
    """``base`` overridden by the policy variables in ``found`` (suffix -> (variable, raw))."""
    parsed = _parsed(_POLICY_SETTINGS, found)
    try:
        layer = Policy(**{attr: value for attr, (_, _, value) in parsed.items()})  # type: ignore[arg-type]
    except ConfigError as error:  # the parsers check syntax; Policy checks ranges: report the variable
        variable, raw, _ = parsed[error.variable.rpartition(".")[2]]
        raise ConfigError(variable, raw, error.expected) from None
    merged = base.merge(layer)
    _check_backoff(merged, found)
    return merged


def _check_backoff(merged: Policy, found: Mapping[str, tuple[str, str | None]]) -> None:
    if merged.backoff_base is None or merged.backoff_cap is None or merged.backoff_base <= merged.backoff_cap:
        return
    cap_variable, cap_raw = found.get("RETRY_BACKOFF_CAP", ("", None))
    if cap_raw is not None and cap_raw.strip():
        raise ConfigError(
            cap_variable, cap_raw, f"a duration no shorter than the backoff base ({merged.backoff_base}s)"
        )
    base_variable, base_raw = found["RETRY_BACKOFF_BASE"]
    raise ConfigError(base_variable, base_raw, f"a duration no longer than the backoff cap ({merged.backoff_cap}s)")


def _resilience_layer(base: ResilienceSettings, found: Mapping[str, tuple[str, str | None]]) -> ResilienceSettings:
    """``base`` overridden by the resilience variables in ``found`` (suffix -> (variable, raw))."""
    parsed = _parsed(_RESILIENCE_SETTINGS, found)
    if not parsed:
        return base
    try:
        return replace(base, **{attr: value for attr, (_, _, value) in parsed.items()})  # type: ignore[arg-type]
    except ConfigError as error:
        attr = error.variable.rpartition(".")[2]
        if attr in parsed:
            variable, raw, _ = parsed[attr]
            raise ConfigError(variable, raw, error.expected) from None
        # outlier_max_ejection < outlier_base_ejection, where only the base was set here
        variable, raw, _ = parsed["outlier_base_ejection"]
        expected = f"a duration no longer than the maximum ejection ({base.outlier_max_ejection}s)"
        raise ConfigError(variable, raw, expected) from None


def _tls_layer(
    base: TLSSettings | None, found: Mapping[str, tuple[str, str | None]], *, mesh_wide: bool = False
) -> TLSSettings | None:
    """``base`` overridden by the TLS variables in ``found`` (suffix -> (variable, raw)); ``None`` if neither.

    A certificate set here comes with its own key (never the key of ``base``); ``verify=false`` here drops an
    inherited SPIFFE ID. Server name and verification are per-service only: mesh-wide they are an error.
    """
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    for suffix, (attr, parse) in _TLS_SETTINGS.items():
        variable, raw = found.get(suffix, ("", None))
        if raw is None or not raw.strip():
            continue
        if mesh_wide and attr in ("server_name", "verify"):
            raise ConfigError(variable, raw, f"a per-service setting: MESHLIB_SERVICE_<NAME>__{suffix}")
        values[attr] = parse(variable, raw.strip())
        sources[attr] = variable
    if not values:
        return base
    start = base if base is not None else TLSSettings()
    if "cert_file" in values:
        values.setdefault("key_file", None)
    if values.get("verify") is False:
        values.setdefault("server_id", None)
    merged = {
        attr: variable
        for attr, variable in {**start.sources, **sources}.items()
        if attr not in values or values[attr] is not None
    }
    return replace(start, **values, sources=MappingProxyType(merged))  # type: ignore[arg-type]


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


def _parse_propagate_to(variable: str, raw: str) -> tuple[str, ...]:
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


_INNER_EXPECTED = "one of httpx, aiohttp (aiohttp: meshlib.AsyncClient only, pip install 'meshlib[aiohttp]')"


def parse_inner_transport(variable: str, raw: str) -> str:
    """``MESHLIB_INNER_TRANSPORT``: ``httpx`` or ``aiohttp`` (case-insensitive)."""
    name = raw.strip().lower()
    if name not in INNER_TRANSPORTS:
        raise ConfigError(variable, raw, _INNER_EXPECTED)
    return name


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


def _duration_or_zero(variable: str, raw: str) -> float:
    return parse_duration(variable, raw, allow_zero=True)


def _parse_int(variable: str, raw: str) -> int:
    if not re.fullmatch(r"[0-9]+", raw):
        raise ConfigError(variable, raw, "a whole number such as 5")
    return int(raw)


_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def _parse_bool(variable: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(variable, raw, "a boolean: true/false, 1/0 or yes/no")


def _parse_text(variable: str, raw: str) -> str:
    return raw


def _parse_server_name(variable: str, raw: str) -> str:
    return raw.lower()


def _parse_statuses(variable: str, raw: str) -> frozenset[int]:
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


def _parse_ratio(variable: str, raw: str) -> float:
    """``0.2`` or ``20%`` -> 0.2 (range checked by :class:`ResilienceSettings`)."""
    value, percent = _parse_number(variable, raw, _RATIO)
    return value / 100.0 if percent else value


def _parse_percent(variable: str, raw: str) -> float:
    """``10`` or ``10%`` -> 10.0 (range checked by :class:`ResilienceSettings`)."""
    return _parse_number(variable, raw, _PERCENT)[0]


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
    "MESHLIB_TLS_RELOAD_INTERVAL": ("tls_reload_interval", _duration_or_zero),
    "MESHLIB_ADMIN_ADDR": ("admin_addr", parse_admin_addr),
    "MESHLIB_PROPAGATE_TO": ("propagate_to", _parse_propagate_to),
    "MESHLIB_INNER_TRANSPORT": ("inner_transport", parse_inner_transport),
}

#: Policy variables: suffix -> Policy field. ``MESHLIB_<SUFFIX>`` mesh-wide, ``MESHLIB_SERVICE_<NAME>__<SUFFIX>``
#: per service.
_POLICY_SETTINGS: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "TIMEOUT": ("timeout", _duration),
    "PER_TRY_TIMEOUT": ("per_try_timeout", _duration),
    "RETRIES": ("retries", _parse_int),
    "RETRY_ON": ("retry_on", _parse_statuses),
    "RETRY_NON_IDEMPOTENT": ("retry_non_idempotent", _parse_bool),
    "RETRY_BACKOFF_BASE": ("backoff_base", _duration_or_zero),
    "RETRY_BACKOFF_CAP": ("backoff_cap", _duration_or_zero),
    "RETRY_AFTER_CAP": ("retry_after_cap", _duration_or_zero),
}

#: Resilience variables: suffix -> ResilienceSettings field, mesh-wide and per service like the above.
_RESILIENCE_SETTINGS: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "RETRY_BUDGET_PERCENT": ("retry_budget_percent", _parse_ratio),
    "RETRY_BUDGET_MIN_PER_SECOND": ("retry_budget_min_per_second", _parse_int),
    "RETRY_BUDGET_TTL": ("retry_budget_ttl", _duration),
    "BREAKER_FAILURES": ("breaker_failures", _parse_int),
    "BREAKER_RESET": ("breaker_reset", _duration),
    "OUTLIER_FAILURES": ("outlier_failures", _parse_int),
    "OUTLIER_BASE_EJECTION": ("outlier_base_ejection", _duration),
    "OUTLIER_MAX_EJECTION": ("outlier_max_ejection", _duration),
    "OUTLIER_MAX_PERCENT": ("outlier_max_percent", _parse_percent),
    "MAX_INFLIGHT": ("max_inflight", _parse_int),
}

#: TLS variables: suffix -> TLSSettings field, ``MESHLIB_TLS_*`` mesh-wide (except ``SERVER_NAME`` and ``VERIFY``,
#: per service only) and ``MESHLIB_SERVICE_<NAME>__TLS_*``. Files are checked when the client loads them.
_TLS_SETTINGS: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "TLS_CA_FILE": ("ca_file", _parse_text),
    "TLS_CERT_FILE": ("cert_file", _parse_text),
    "TLS_KEY_FILE": ("key_file", _parse_text),
    "TLS_SERVER_NAME": ("server_name", _parse_server_name),
    "TLS_SERVER_ID": ("server_id", _parse_text),
    "TLS_VERIFY": ("verify", _parse_bool),
}

_LAYERED = {**_POLICY_SETTINGS, **_RESILIENCE_SETTINGS, **_TLS_SETTINGS}
SERVICE_SETTINGS.update({suffix: "policy" for suffix in _POLICY_SETTINGS})
SERVICE_SETTINGS.update({suffix: "resilience" for suffix in _RESILIENCE_SETTINGS})
SERVICE_SETTINGS.update({suffix: "tls" for suffix in _TLS_SETTINGS})

#: Variables read by other parts of meshlib (kept here so unknown-variable warnings know them).
KNOWN = frozenset(_GLOBALS) | {f"{ENV_PREFIX}{suffix}" for suffix in _LAYERED}
