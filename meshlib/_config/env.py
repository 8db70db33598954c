"""``MESHLIB_*`` environment variables (and constructor arguments) read into a :class:`MeshConfig`.

Every ``MESHLIB_*`` variable a client uses is read here (the tables below), so ``docs/configuration.md`` can
list them all; only ``meshlib status`` (:mod:`meshlib.tools.cli`) also reads ``MESHLIB_ADMIN_ADDR``, with the same
parser. A bad value raises :class:`meshlib.ConfigError` naming the variable, the value and what was expected,
at client construction; nothing is validated lazily on the request path.

Naming: ``MESHLIB_SERVICE_<NAME>=<target URI>`` declares a mesh service, where ``<NAME>`` is the request
host upper-cased with ``-`` and ``.`` as ``_`` (``user-api.internal`` -> ``USER_API_INTERNAL``). A
per-service setting is the global variable's suffix after a double underscore:
``MESHLIB_SERVICE_PAYMENTS__LB=ring_hash`` overrides ``MESHLIB_LB`` for ``payments`` only.

Call policies (``MESHLIB_TIMEOUT``, ``MESHLIB_RETRIES``...) become :class:`~meshlib.policy.Policy` layers and
resilience knobs (``MESHLIB_MAX_INFLIGHT``, ``MESHLIB_BREAKER_FAILURES``...) a :class:`ResilienceSettings`;
both work per service with the same suffix.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple

from meshlib._config.model import MeshConfig, ResilienceSettings, ServiceConfig, ZoneSettings, service_key
from meshlib._config.parse import (
    parse_admin_addr,
    parse_bool,
    parse_dns_servers,
    parse_duration_or_zero,
    parse_file_path,
    parse_fraction,
    parse_header,
    parse_inner_transport,
    parse_int,
    parse_lb,
    parse_namespace,
    parse_percent,
    parse_positive_duration,
    parse_propagate_to,
    parse_server_name,
    parse_server_telemetry,
    parse_statuses,
    parse_text,
    parse_xds_mode,
)
from meshlib.errors import ConfigError
from meshlib.policy import DEFAULT_POLICY, Policy
from meshlib.resilience.hedging import HedgePolicy, HedgeSettings, hedge_from_env
from meshlib.security.tls import TLSSettings

if TYPE_CHECKING:
    from meshlib.balance.wrr import WrrSettings

#: Unknown-variable warnings keep the logger name of the module that used to hold all of this.
logger = logging.getLogger("meshlib.config")


def parse_mirror_concurrency(variable: str, raw: str) -> int:
    """``MESHLIB_MIRROR_CONCURRENCY``: mirrored requests in flight per client, 1..10,000."""
    value = parse_int(variable, raw)
    if not 1 <= value <= 10_000:
        raise ConfigError(variable, raw, "an integer from 1 to 10,000")
    return value


def parse_whole_percent(variable: str, raw: str) -> int:
    """``85`` or ``85%`` -> 85: a whole percentage from 0 to 100 (Envoy's outlier percentages are integers)."""
    value = parse_percent(variable, raw)
    if not (0 <= value <= 100 and value == int(value)):
        raise ConfigError(variable, raw, "a whole percentage from 0 to 100 such as 85 or 85%")
    return int(value)


def parse_aggression(variable: str, raw: str) -> float:
    """``MESHLIB_SLOW_START_AGGRESSION``: a decimal above zero such as ``1.0`` (range checked by the settings)."""
    text = raw.strip()
    if not re.fullmatch(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)", text, re.ASCII) or len(text) > 32:
        raise ConfigError(variable, raw, "a number greater than 0 such as 1.0 (1.0 ramps linearly)")
    return float(text)


ENV_PREFIX = "MESHLIB_"
SERVICE_PREFIX = "MESHLIB_SERVICE_"
#: Separates a service name from a per-service setting: ``MESHLIB_SERVICE_PAYMENTS__LB``.
SERVICE_SETTING_SEPARATOR = "__"

#: Per-service settings: suffix after ``MESHLIB_SERVICE_<NAME>__`` -> ServiceConfig field. Every policy and
#: resilience suffix (``TIMEOUT``, ``RETRIES``, ``BREAKER_FAILURES``...) is added below, after their tables.
SERVICE_SETTINGS = {"LB": "lb", "HASH_HEADER": "hash_header"}

_Parser = Callable[[str, str], object]

#: Mesh-wide only: variable -> MeshConfig field.
_GLOBALS: dict[str, tuple[str, _Parser]] = {
    "MESHLIB_LB": ("lb", parse_lb),
    "MESHLIB_HASH_HEADER": ("hash_header", parse_header),
    "MESHLIB_DNS_SERVERS": ("dns_servers", parse_dns_servers),
    "MESHLIB_DNS_TIMEOUT": ("dns_timeout", parse_positive_duration),
    "MESHLIB_DNS_TTL_MIN": ("ttl_min", parse_positive_duration),
    "MESHLIB_DNS_TTL_MAX": ("ttl_max", parse_positive_duration),
    "MESHLIB_DISCOVERY_MAX_STALE": ("max_stale", parse_positive_duration),
    "MESHLIB_EWMA_DECAY": ("ewma_decay", parse_positive_duration),
    "MESHLIB_EWMA_DEFAULT_RTT": ("default_rtt", parse_positive_duration),
    "MESHLIB_TLS_RELOAD_INTERVAL": ("tls_reload_interval", parse_duration_or_zero),
    "MESHLIB_ADMIN_ADDR": ("admin_addr", parse_admin_addr),
    "MESHLIB_PROPAGATE_TO": ("propagate_to", parse_propagate_to),
    "MESHLIB_INNER_TRANSPORT": ("inner_transport", parse_inner_transport),
    "MESHLIB_ROUTES_FILE": ("routes_file", parse_file_path),
    "MESHLIB_ROUTES_RELOAD_INTERVAL": ("routes_reload_interval", parse_duration_or_zero),
    "MESHLIB_NAMESPACE": ("namespace", parse_namespace),
    "MESHLIB_MIRROR_CONCURRENCY": ("mirror_concurrency", parse_mirror_concurrency),
    "MESHLIB_XDS": ("xds", parse_xds_mode),
}

#: Policy variables: suffix -> Policy field. ``MESHLIB_<SUFFIX>`` mesh-wide, ``MESHLIB_SERVICE_<NAME>__<SUFFIX>``
#: per service.
_POLICY_SETTINGS: dict[str, tuple[str, _Parser]] = {
    "TIMEOUT": ("timeout", parse_positive_duration),
    "PER_TRY_TIMEOUT": ("per_try_timeout", parse_positive_duration),
    "RETRIES": ("retries", parse_int),
    "RETRY_ON": ("retry_on", parse_statuses),
    "RETRY_NON_IDEMPOTENT": ("retry_non_idempotent", parse_bool),
    "RETRY_BACKOFF_BASE": ("backoff_base", parse_duration_or_zero),
    "RETRY_BACKOFF_CAP": ("backoff_cap", parse_duration_or_zero),
    "RETRY_AFTER_CAP": ("retry_after_cap", parse_duration_or_zero),
}

#: Resilience variables: suffix -> ResilienceSettings field, mesh-wide and per service like the above.
#: ``RETRY_BUDGET_PERCENT`` keeps its published name but sets a fraction (it accepts ``0.2`` or ``20%``).
_RESILIENCE_SETTINGS: dict[str, tuple[str, _Parser]] = {
    "RETRY_BUDGET_PERCENT": ("retry_budget_fraction", parse_fraction),
    "RETRY_BUDGET_MIN_PER_SECOND": ("retry_budget_min_per_second", parse_int),
    "RETRY_BUDGET_TTL": ("retry_budget_ttl", parse_positive_duration),
    "BREAKER_FAILURES": ("breaker_failures", parse_int),
    "BREAKER_RESET": ("breaker_reset", parse_positive_duration),
    "OUTLIER_FAILURES": ("outlier_failures", parse_int),
    "OUTLIER_BASE_EJECTION": ("outlier_base_ejection", parse_positive_duration),
    "OUTLIER_MAX_EJECTION": ("outlier_max_ejection", parse_positive_duration),
    "OUTLIER_MAX_PERCENT": ("outlier_max_percent", parse_percent),
    "MAX_INFLIGHT": ("max_inflight", parse_int),
    "ADAPTIVE_CONCURRENCY": ("adaptive_concurrency", parse_bool),
    "ADAPTIVE_INITIAL_LIMIT": ("adaptive_initial_limit", parse_int),
    "ADAPTIVE_MIN_LIMIT": ("adaptive_min_limit", parse_int),
    "ADAPTIVE_MAX_LIMIT": ("adaptive_max_limit", parse_int),
    "ADAPTIVE_WINDOW": ("adaptive_window", parse_positive_duration),
    "ADAPTIVE_WINDOW_SAMPLES": ("adaptive_window_samples", parse_int),
    "OUTLIER_INTERVAL": ("outlier_interval", parse_positive_duration),
    "OUTLIER_SUCCESS_RATE_ENFORCEMENT_PERCENT": ("outlier_success_rate_enforcement_percent", parse_whole_percent),
    "OUTLIER_SUCCESS_RATE_MINIMUM_HOSTS": ("outlier_success_rate_minimum_hosts", parse_int),
    "OUTLIER_SUCCESS_RATE_REQUEST_VOLUME": ("outlier_success_rate_request_volume", parse_int),
    "OUTLIER_SUCCESS_RATE_STDEV_FACTOR": ("outlier_success_rate_stdev_factor", parse_int),
    "OUTLIER_FAILURE_PERCENTAGE_ENFORCEMENT_PERCENT": (
        "outlier_failure_percentage_enforcement_percent",
        parse_whole_percent,
    ),
    "OUTLIER_FAILURE_PERCENTAGE_THRESHOLD": ("outlier_failure_percentage_threshold", parse_whole_percent),
    "OUTLIER_FAILURE_PERCENTAGE_MINIMUM_HOSTS": ("outlier_failure_percentage_minimum_hosts", parse_int),
    "OUTLIER_FAILURE_PERCENTAGE_REQUEST_VOLUME": ("outlier_failure_percentage_request_volume", parse_int),
    "SLOW_START_WINDOW": ("slow_start_window", parse_duration_or_zero),
    "SLOW_START_AGGRESSION": ("slow_start_aggression", parse_aggression),
    "SLOW_START_MIN_WEIGHT_PERCENT": ("slow_start_min_weight_percent", parse_percent),
    # Maximum connection age (meshlib._connection_age): 0 = off; the jitter accepts 0.1 or 10%.
    "MAX_CONNECTION_AGE": ("max_connection_age", parse_duration_or_zero),
    "MAX_CONNECTION_AGE_JITTER": ("max_connection_age_jitter", parse_fraction),
}

#: A check across resilience settings names one field; when that field was not set in the layer being read
#: (a per-service ``ADAPTIVE_MAX_LIMIT`` under a mesh-wide ``ADAPTIVE_MIN_LIMIT``), the error names the first
#: of these that was.
_RELATED = {
    "adaptive_min_limit": ("adaptive_max_limit",),
    "adaptive_initial_limit": ("adaptive_min_limit", "adaptive_max_limit"),
}

#: TLS variables: suffix -> TLSSettings field, ``MESHLIB_TLS_*`` mesh-wide (except ``SERVER_NAME`` and ``VERIFY``,
#: per service only) and ``MESHLIB_SERVICE_<NAME>__TLS_*``. Files are checked when the client loads them.
_TLS_SETTINGS: dict[str, tuple[str, _Parser]] = {
    "TLS_CA_FILE": ("ca_file", parse_text),
    "TLS_CERT_FILE": ("cert_file", parse_text),
    "TLS_KEY_FILE": ("key_file", parse_text),
    "TLS_SERVER_NAME": ("server_name", parse_server_name),
    "TLS_SERVER_ID": ("server_id", parse_text),
    "TLS_VERIFY": ("verify", parse_bool),
}

#: Hedging variables (:func:`meshlib.resilience.hedging.hedge_from_env` parses them, several into one value):
#: the call's rules go to ``Policy.hedge``, the sizes of the service's hedging state to ``ResilienceSettings.hedge``.
_HEDGE_POLICY = ("HEDGE_MAX_ATTEMPTS", "HEDGE_DELAY", "HEDGE_NON_FATAL", "HEDGE_NON_IDEMPOTENT")
_HEDGE_SETTINGS = ("HEDGE_MAX_EXTRA_LOAD", "HEDGE_MIN_DELAY", "HEDGE_WINDOW", "HEDGE_MIN_SAMPLES")

_LAYERED = {
    **_POLICY_SETTINGS,
    **_RESILIENCE_SETTINGS,
    **_TLS_SETTINGS,
    **{suffix: ("hedge", parse_text) for suffix in _HEDGE_POLICY + _HEDGE_SETTINGS},
}
SERVICE_SETTINGS.update({suffix: "policy" for suffix in (*_POLICY_SETTINGS, *_HEDGE_POLICY)})
SERVICE_SETTINGS.update({suffix: "resilience" for suffix in (*_RESILIENCE_SETTINGS, *_HEDGE_SETTINGS)})
SERVICE_SETTINGS.update({suffix: "tls" for suffix in _TLS_SETTINGS})

#: Zone-aware routing (:mod:`meshlib.balance.locality`): the client's own zone is mesh-wide only; the minimum
#: cluster size and failover are mesh-wide and per service. Read by :func:`zone_settings_from_env`, checked at
#: construction; not part of the ServiceConfig fields (hence the ``"zone"`` marker below, skipped there).
ZONE_VARIABLE = "MESHLIB_ZONE"
CONSUL_ZONE_KEY_VARIABLE = "MESHLIB_CONSUL_ZONE_KEY"
_ZONE_SETTINGS = ("ZONE_MIN_CLUSTER_SIZE", "ZONE_FAILOVER")
SERVICE_SETTINGS.update({suffix: "zone" for suffix in _ZONE_SETTINGS})
#: A zone name: what static ``;zone=`` accepts, plus ``/``, at most 128 characters.
_ZONE_NAME = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")

#: Variables read by other parts of meshlib (kept here so unknown-variable warnings know them).
#: Read elsewhere, not into MeshConfig: which HTTP library the top-level ``meshlib.Client`` is (``meshlib``);
#: who makes an inbound request's SERVER span and HTTP server metrics (the inbound middleware, read by
#: :func:`server_telemetry_from_env` when it is built).
SERVER_TELEMETRY_VARIABLE = "MESHLIB_SERVER_TELEMETRY"
#: The inbound middleware's policy files (read by :func:`inbound_files_from_env` when it is built).
AUTHZ_FILE_VARIABLE = "MESHLIB_AUTHZ_FILE"
RATELIMIT_FILE_VARIABLE = "MESHLIB_RATELIMIT_FILE"
INBOUND_RELOAD_VARIABLE = "MESHLIB_INBOUND_RELOAD_INTERVAL"
#: ``weighted_round_robin``'s A58 settings (read by :func:`wrr_settings_from_env` when the balancer is built).
WRR_VARIABLES = (
    "MESHLIB_WRR_BLACKOUT_PERIOD",
    "MESHLIB_WRR_WEIGHT_EXPIRATION_PERIOD",
    "MESHLIB_WRR_WEIGHT_UPDATE_PERIOD",
    "MESHLIB_WRR_ERROR_UTILIZATION_PENALTY",
)
_READ_ELSEWHERE = frozenset(
    {
        *WRR_VARIABLES,
        "MESHLIB_HTTP_LIBRARY",
        SERVER_TELEMETRY_VARIABLE,
        AUTHZ_FILE_VARIABLE,
        RATELIMIT_FILE_VARIABLE,
        INBOUND_RELOAD_VARIABLE,
        "MESHLIB_CONSUL_SERVICE",  # the Consul identity: meshlib.security.consul_ca, the client's pool factory
        CONSUL_ZONE_KEY_VARIABLE,  # the Consul resolver (meshlib.discovery.consul.resolver.from_target)
        ZONE_VARIABLE,
    }
)
KNOWN = frozenset(_GLOBALS) | {f"{ENV_PREFIX}{suffix}" for suffix in (*_LAYERED, *_ZONE_SETTINGS)} | _READ_ELSEWHERE


def parse_zone(variable: str, raw: str) -> str:
    """A zone name (``us-east-1a``): letters, digits and ``_ . : / -``, 1..128 characters."""
    value = raw.strip()
    if not _ZONE_NAME.fullmatch(value):
        raise ConfigError(variable, raw, "a zone name of letters, digits and '_.:/-' (1 to 128 characters)")
    return value


def parse_min_cluster_size(variable: str, raw: str) -> int:
    """``MESHLIB_ZONE_MIN_CLUSTER_SIZE``: healthy endpoints below which zone routing is off, 0..1,000,000."""
    value = parse_int(variable, raw.strip())
    if value > 1_000_000:
        raise ConfigError(variable, raw, "a whole number from 0 to 1,000,000 (Envoy's default is 6)")
    return value


def parse_zone_failover(variable: str, raw: str) -> tuple[bool, tuple[str, ...]]:
    """``MESHLIB_ZONE_FAILOVER``: ``0``/``off`` (proportional zone-aware routing), ``1``/``on`` (priority
    failover: local zone, then the others) or an ordered zone list ``b,c`` (local zone, then b, then c, then
    the rest)."""
    value = raw.strip()
    if value.lower() in ("0", "off", "false", "no"):
        return False, ()
    if value.lower() in ("1", "on", "true", "yes"):
        return True, ()
    zones = tuple(part.strip() for part in value.split(","))
    if not all(_ZONE_NAME.fullmatch(zone) for zone in zones) or len(set(zones)) != len(zones):
        raise ConfigError(
            variable, raw, "0/off, 1/on, or a comma-separated list of distinct zone names such as us-east-1b,us-east-1c"
        )
    return True, zones


def zone_settings_from_env(environ: Mapping[str, str] | None = None, service: str | None = None) -> ZoneSettings:
    """Zone-aware routing settings: ``MESHLIB_ZONE``, ``MESHLIB_ZONE_MIN_CLUSTER_SIZE``, ``MESHLIB_ZONE_FAILOVER``,
    overridden for ``service`` (its key, ``PAYMENTS``) by ``MESHLIB_SERVICE_<NAME>__ZONE_MIN_CLUSTER_SIZE`` and
    ``__ZONE_FAILOVER``. Unset or blank means the default (no zone: routing off; 6; off)."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    raw = env.get(ZONE_VARIABLE, "")
    if raw.strip():
        values["zone"] = parse_zone(ZONE_VARIABLE, raw)
    prefixes = [ENV_PREFIX] + ([f"{SERVICE_PREFIX}{service}{SERVICE_SETTING_SEPARATOR}"] if service else [])
    for prefix in prefixes:
        variable = f"{prefix}ZONE_MIN_CLUSTER_SIZE"
        raw = env.get(variable, "")
        if raw.strip():
            values["min_cluster_size"] = parse_min_cluster_size(variable, raw)
        variable = f"{prefix}ZONE_FAILOVER"
        raw = env.get(variable, "")
        if raw.strip():
            values["failover"], values["failover_order"] = parse_zone_failover(variable, raw)
    return ZoneSettings(**values)  # type: ignore[arg-type]


def server_telemetry_from_env(value: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """``auto``, ``on`` or ``off``: ``value`` (a constructor argument) if given, else ``MESHLIB_SERVER_TELEMETRY``.

    Unset or blank means ``auto``. A bad value is a :class:`ConfigError` naming the argument or the variable.
    """
    if value is not None:
        return parse_server_telemetry("server_telemetry (argument)", value)
    raw = (os.environ if environ is None else environ).get(SERVER_TELEMETRY_VARIABLE, "")
    return parse_server_telemetry(SERVER_TELEMETRY_VARIABLE, raw) if raw.strip() else "auto"


class InboundFiles(NamedTuple):
    """The inbound middleware's policy files from the environment (``None``: not set) and how often to check them."""

    authz: str | None
    rate_limits: str | None
    reload_interval: float


def inbound_files_from_env(environ: Mapping[str, str] | None = None) -> InboundFiles:
    """``MESHLIB_AUTHZ_FILE``, ``MESHLIB_RATELIMIT_FILE`` and ``MESHLIB_INBOUND_RELOAD_INTERVAL`` (default 1 s; ``0``
    reads the files once). Unset or blank means no file. A bad value is a :class:`ConfigError` naming the variable."""
    env = os.environ if environ is None else environ

    def path(variable: str) -> str | None:
        raw = env.get(variable, "")
        return parse_file_path(variable, raw) if raw.strip() else None

    raw_interval = env.get(INBOUND_RELOAD_VARIABLE, "")
    interval = parse_duration_or_zero(INBOUND_RELOAD_VARIABLE, raw_interval) if raw_interval.strip() else 1.0
    return InboundFiles(path(AUTHZ_FILE_VARIABLE), path(RATELIMIT_FILE_VARIABLE), interval)


def wrr_settings_from_env(environ: Mapping[str, str] | None = None) -> WrrSettings:
    """``weighted_round_robin``'s settings from ``MESHLIB_WRR_*`` (unset or blank: A58's defaults).

    The three periods are durations (``MESHLIB_WRR_BLACKOUT_PERIOD`` may be ``0``: no blackout; the update period
    is at least 100 ms, as A58 caps it); the penalty a number >= 0. A bad value is a :class:`ConfigError`.
    """
    from meshlib.balance.wrr import WrrSettings

    env = os.environ if environ is None else environ
    blackout, expiration, update, penalty = WRR_VARIABLES
    values: dict[str, float] = {}
    for attr, variable, parse in (
        ("blackout_period", blackout, parse_duration_or_zero),
        ("weight_expiration_period", expiration, parse_positive_duration),
        ("weight_update_period", update, parse_positive_duration),
    ):
        raw = env.get(variable, "")
        if raw.strip():
            values[attr] = parse(variable, raw)
    raw = env.get(penalty, "")
    if raw.strip():
        try:
            number = float(raw.strip()) if len(raw) <= 32 else math.nan
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or number < 0:
            raise ConfigError(penalty, raw[:32], "a number >= 0 (A58's error_utilization_penalty, default 1.0)")
        values["error_utilization_penalty"] = number
    return WrrSettings(**values)


def mesh_config_from_env(
    cls: type[MeshConfig],
    environ: Mapping[str, str] | None = None,
    *,
    services: Mapping[str, str | ServiceConfig] | None = None,
    lb: str | None = None,
    dns_servers: str | list[str] | tuple[str, ...] | None = None,
    policy: Policy | None = None,
    tls: TLSSettings | None = None,
) -> MeshConfig:
    """:meth:`MeshConfig.from_env` (which calls this with its class): ``MESHLIB_*`` of ``environ``, arguments win."""
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
        values["lb"] = parse_lb("lb (argument)", lb)
    if dns_servers is not None:
        raw_servers = dns_servers if isinstance(dns_servers, str) else ",".join(dns_servers)
        values["dns_servers"] = parse_dns_servers("dns_servers (argument)", raw_servers)
    config = cls(**values)  # type: ignore[arg-type]
    if config.ttl_min > config.ttl_max:
        raise ConfigError(
            "MESHLIB_DNS_TTL_MIN",
            config.ttl_min,
            f"a duration no larger than MESHLIB_DNS_TTL_MAX ({config.ttl_max})",
        )
    zone_settings_from_env(env)  # checked at construction (the service reads them when it builds its picker)
    if any(env.get(variable, "").strip() for variable in WRR_VARIABLES):
        wrr_settings_from_env(env)  # likewise weighted_round_robin's (read again when its balancer is built)
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
            parse_lb(f"{SERVICE_PREFIX}{service_key(svc.name)}__LB", svc.lb)
    return replace(config, services=MappingProxyType(found), environ=environ)


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
            SERVICE_SETTINGS[suffix]: raw.strip()
            for suffix, (_, raw) in extra.items()
            if suffix not in _LAYERED and suffix not in _ZONE_SETTINGS
        }
        if any(suffix in _ZONE_SETTINGS for suffix in extra):  # checked now, kept in the environment for the client
            zone_settings_from_env(env, key)
        if "HASH_HEADER" in extra:  # checked here, so the error names the variable (the name keeps its case)
            parse_header(*extra["HASH_HEADER"])
        layered = {suffix: pair for suffix, pair in extra.items() if suffix in _LAYERED}
        if any(suffix in _POLICY_SETTINGS or suffix in _HEDGE_POLICY for suffix in layered):
            layer = _policy_layer(Policy(), layered)
            _check_backoff(mesh_policy.merge(layer), layered)
            fields["policy"] = layer
        if any(suffix in _RESILIENCE_SETTINGS or suffix in _HEDGE_SETTINGS for suffix in layered):
            fields["resilience"] = _resilience_layer(mesh_resilience, layered)
        if any(suffix in _TLS_SETTINGS for suffix in layered):
            fields["tls"] = _tls_layer(mesh_tls, layered)
        targets[key] = replace(targets[key], **fields)  # type: ignore[arg-type]
    return targets


def _parsed(
    table: Mapping[str, tuple[str, _Parser]], found: Mapping[str, tuple[str, str | None]]
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
    hedge = _hedge(found, _HEDGE_POLICY, None)
    if hedge is not None:
        layer = layer.merge(Policy(hedge=hedge[0]))
    merged = base.merge(layer)
    _check_backoff(merged, found)
    return merged


def _hedge(
    found: Mapping[str, tuple[str, str | None]], suffixes: tuple[str, ...], base: HedgeSettings | None
) -> tuple[HedgePolicy, HedgeSettings] | None:
    """The hedging policy layer and settings from the ``suffixes`` set in ``found``; ``None`` if none is."""
    present = {
        variable: raw
        for suffix in suffixes
        for variable, raw in (found.get(suffix, ("", None)),)
        if raw is not None and raw.strip() != ""
    }
    if not present:
        return None
    variable = next(iter(present))
    prefix = variable[: variable.rindex("HEDGE_")]  # MESHLIB_ or MESHLIB_SERVICE_<NAME>__
    return hedge_from_env(present, prefix, base)


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
    hedge = _hedge(found, _HEDGE_SETTINGS, base.hedge)
    if hedge is not None:
        base = replace(base, hedge=hedge[1])
    if not parsed:
        return base
    try:
        return replace(base, **{attr: value for attr, (_, _, value) in parsed.items()})  # type: ignore[arg-type]
    except ConfigError as error:
        attr = error.variable.rpartition(".")[2]
        if attr in parsed:
            variable, raw, _ = parsed[attr]
            raise ConfigError(variable, raw, error.expected) from None
        if attr == "outlier_max_ejection":  # outlier_max_ejection < outlier_base_ejection, only the base set here
            variable, raw, _ = parsed["outlier_base_ejection"]
            expected = f"a duration no longer than the maximum ejection ({base.outlier_max_ejection}s)"
            raise ConfigError(variable, raw, expected) from None
        other = next(name for name in _RELATED.get(attr, ()) if name in parsed)
        variable, raw, _ = parsed[other]
        name = next((f"{ENV_PREFIX}{k}" for k, (a, _) in _RESILIENCE_SETTINGS.items() if a == attr), attr)
        expected = f"a value that keeps {name}={error.value!r} valid ({name}: {error.expected})"
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
        if raw is None:
            continue
        if not raw.strip():  # security settings never fail open: set-but-blank is a mistake, not "unset"
            raise ConfigError(variable, raw, "a value (a blank TLS setting is refused; unset the variable to inherit)")
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
